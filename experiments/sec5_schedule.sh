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
# Once a seed's six runs have finished, their results (metrics.json, analysis/*.parquet, the
# overrides and the precision the run chose; never checkpoints) are copied to
# experiments/results/sec5_schedule/<preset>_<steps>/, which is committed:
# a seed found there is skipped, so the measurement accumulates across sessions and fresh clones,
# and `python experiments/sec5_schedule.py` builds the figure and table across lengths from it.
# One thread per run (OMP_NUM_THREADS=1): runs side by side on a shared 2-core box (e.g. one
# script per length).
set -euo pipefail
PRESET=${PRESET:-quick}
SEEDS=${SEEDS:-0,1,2,3,4}
# Fig. 5a's lesion sweep: the study's defaults on digits (10 random sets per k; bn=recalibrate
# re-estimates on 20 training batches of 64). On Fashion-MNIST, where one 28x28 ResNet-110 lesion
# costs ~12 s of a core on the 2,000 test images: 5 sets per k, as its earlier table
# (experiments/lesions.md), and re-estimation on 10 batches of 128 (the same 1,280 images).
lesion=(+lesion@callbacks.delete_many=delete_many) recal=(callbacks.delete_many.bn=recalibrate)
if [ "$PRESET" = medium ]; then
  lesion+=(callbacks.delete_many.trials=5) recal+=(callbacks.delete_many.bn_batches=10)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
STEPS=("$@"); [ ${#STEPS[@]} -gt 0 ] || STEPS=(400 1600 6400)
source "$(dirname "$0")/store.sh"  # run <dir> <overrides...>, keep <root> <store> <run...>
for L in "${STEPS[@]}"; do
  root=outputs/sec5_schedule/${PRESET}_${L}
  store=experiments/results/sec5_schedule/${PRESET}_${L}
  sched=(trainer.max_steps="$L" "optim.milestones=[$((L / 2)),$((3 * L / 4))]" optim.warmup_steps=$((L / 20)))
  for seed in ${SEEDS//,/ }; do
    runs=(train/k23_seed$seed train/k54_seed$seed retest/k23_seed${seed}_{rescale,recalibrate,ensemble}
      retest/k54_seed${seed}_delete_many_recalibrate)
    if [ -f "$store/${runs[-1]}/metrics.json" ]; then continue; fi  # kept by an earlier session
    for k in 23 54; do  # k = 54 of 54: every block every step (full training), Fig. 5a's network
      fig5a=(); [ $k = 54 ] && fig5a=("${lesion[@]}")
      run "$root/train/k${k}_seed$seed" experiment_name=effective_paths preset="$PRESET" \
        model=resnet110 training=block_subset training.k=$k seed="$seed" "${sched[@]}" "${fig5a[@]}"
    done
    ckpt=$root/train/k23_seed$seed/checkpoints/last.ckpt
    for rule in rescale recalibrate ensemble; do
      run "$root/retest/k23_seed${seed}_$rule" train=false ckpt_path="$ckpt" \
        training=block_subset training.test_mode=$rule
    done
    run "$root/retest/k54_seed${seed}_delete_many_recalibrate" train=false \
      ckpt_path="$root/train/k54_seed$seed/checkpoints/last.ckpt" \
      "${lesion[@]}" "${recal[@]}"
    keep "$root" "$store" "${runs[@]}"
    echo "sec5_schedule: ${PRESET}_$L seed $seed kept in $store"
  done
  if [ -d "$root" ]; then python -m src.report "$root"; fi
done
