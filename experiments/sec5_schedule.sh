#!/usr/bin/env bash
# Sec. 5 and Fig. 5a against training length (issue 21, part 2): on digits (quick preset,
# ResNet-110's 54 blocks) at 400, 1,600 and 6,400 steps, the preset's schedule shape stretched
# (warm-up 5%, lr/10 at 50% and 75%), 23-of-54 block-subset training vs full training (k = 54),
# seeds 0-4, the two arms of a seed paired. Every block-subset checkpoint is then tested under
# every other test-time rule, and every full-training checkpoint gets Fig. 5a (delete_many) with
# trained (bn=eval, during the sweep) and re-estimated (bn=recalibrate) statistics.
#   bash experiments/sec5_schedule.sh [steps ...]          # default: 400 1600 6400
#   PRESET=medium SEEDS=0,1,2 bash experiments/sec5_schedule.sh 700 2800    # Fashion-MNIST
# Each length runs in outputs/sec5_schedule/<preset>_<steps>/ (train/: the trainings, retest/:
# the train=false re-tests); `python -m src.report outputs/sec5_schedule/<preset>_<steps>` rebuilds its report.
# Each arm of a seed is kept as soon as its runs have finished (the 23-block arm: its training
# and three re-tests; the full arm: its training with Fig. 5a's bn=eval sweep and the
# bn=recalibrate re-test): their results (metrics.json, analysis/*.parquet, the overrides and the
# precision the run chose; never checkpoints, so an arm cut off mid-way starts again in a fresh
# clone) are copied to experiments/results/sec5_schedule/<preset>_<steps>/, which is committed:
# an arm found there is skipped, so the measurement accumulates across sessions and fresh clones,
# and `python experiments/sec5_schedule.py` builds the figure and table across lengths from the
# seeds whose two arms are both there. ARMS picks the arms (default "23 54"), so that one arm fits
# a session: at 2,800 Fashion-MNIST steps the 23-block arm took 1 h 50 min on one core beside a
# second one (1.8-2.2 s per step, re-tests 10 min; AVX2 EPYC); the full arm with its two lesion
# sweeps took 62 min of both idle cores (OMP_NUM_THREADS=2, 1.0-1.1 s per step; AVX512 EPYC).
# One thread per run (OMP_NUM_THREADS=1): runs side by side on a shared 2-core box (e.g. one
# script per length or per seed). The precision is pinned (PRECISION, default 32-true; the memory
# format follows it), not left to trainer.precision's auto choice: the arms of one seed may be
# trained in different sessions on different CPUs, and a CPU with native bf16 would otherwise
# train its arm in bf16 beside an fp32 partner (experiments/sec5_schedule.py leaves such a
# seed out). Every kept run so far trained in fp32.
set -euo pipefail
PRESET=${PRESET:-quick}
SEEDS=${SEEDS:-0,1,2,3,4}
ARMS=${ARMS:-23 54}
# Fig. 5a's lesion sweep: the study's defaults on digits (10 random sets per k; bn=recalibrate
# re-estimates on 20 training batches of 64). On Fashion-MNIST, where one 28x28 ResNet-110 lesion
# costs ~12 s of a core on the 2,000 test images: 5 sets per k, as its earlier table
# (experiments/lesions.md), and re-estimation on 10 batches of 128 (the same 1,280 images).
lesion=(+lesion@callbacks.delete_many=delete_many) recal=(callbacks.delete_many.bn=recalibrate)
if [ "$PRESET" = medium ]; then
  lesion+=(callbacks.delete_many.trials=5) recal+=(callbacks.delete_many.bn_batches=10)
fi
pin=(trainer.precision="${PRECISION:-32-true}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
STEPS=("$@"); [ ${#STEPS[@]} -gt 0 ] || STEPS=(400 1600 6400)
source "$(dirname "$0")/store.sh"  # run <dir> <overrides...>, keep <root> <store> <run...>
for L in "${STEPS[@]}"; do
  root=outputs/sec5_schedule/${PRESET}_${L}
  store=experiments/results/sec5_schedule/${PRESET}_${L}
  sched=(trainer.max_steps="$L" "optim.milestones=[$((L / 2)),$((3 * L / 4))]" optim.warmup_steps=$((L / 20)))
  for seed in ${SEEDS//,/ }; do
    for k in $ARMS; do  # k = 54 of 54: every block every step (full training), Fig. 5a's network
      train=train/k${k}_seed$seed ckpt=$root/train/k${k}_seed$seed/checkpoints/last.ckpt
      if [ $k = 54 ]; then runs=("$train" retest/k54_seed${seed}_delete_many_recalibrate)
      else runs=("$train" retest/k${k}_seed${seed}_{rescale,recalibrate,ensemble}); fi
      if [ -f "$store/${runs[-1]}/metrics.json" ]; then continue; fi  # kept by an earlier session
      fig5a=(); [ $k = 54 ] && fig5a=("${lesion[@]}")
      run "$root/$train" experiment_name=effective_paths preset="$PRESET" \
        model=resnet110 training=block_subset training.k=$k seed="$seed" "${sched[@]}" "${fig5a[@]}" "${pin[@]}"
      if [ $k = 54 ]; then
        run "$root/${runs[1]}" train=false ckpt_path="$ckpt" "${lesion[@]}" "${recal[@]}" "${pin[@]}"
      else
        for rule in rescale recalibrate ensemble; do
          run "$root/retest/k${k}_seed${seed}_$rule" train=false ckpt_path="$ckpt" \
            training=block_subset training.test_mode=$rule "${pin[@]}"
        done
      fi
      keep "$root" "$store" "${runs[@]}"
      echo "sec5_schedule: ${PRESET}_$L seed $seed, k = $k kept in $store"
    done
  done
  if [ -d "$root" ]; then python -m src.report "$root"; fi
done
