#!/usr/bin/env bash
# The digits (quick preset) tables of experiments/lesions.md and experiments/paths.md, measured
# with the current code: Fig. 3 (ResNet-110 and VGG-15, delete_single), Figs 5a and 5b
# (delete_many and reorder on Fig. 3's ResNet-110), Figs 6b/6c with the exact decomposition
# (gradient_paths on the same checkpoint, 20 paths per length on 4 batches), Fig. 8 (stochastic
# depth beside Fig. 3's standard training), Fig. 4 (ResNet-200's layout) and the 9-block Sec. 5
# sweep (4 of 9 blocks per step against all 9, seeds 0-3, block-subset nets re-tested with
# `rescale`). Each is the documented command with its sweep spelled out as single runs
# (`hydra.mode=RUN`), so every run is resumable on its own:
#   bash experiments/quick_tables.sh
# Runs land in outputs/quick_tables/<table>/<run>/; once a table's runs have finished, their
# results (no checkpoints) are kept in the committed experiments/results/quick_tables/<table>/,
# whose report (`python -m src.report experiments/results/quick_tables/<table>`) is rebuilt.
# One thread per run (OMP_NUM_THREADS=1), beside other work on a 2-core box: ~1 hour of a core.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
source "$(dirname "$0")/store.sh"
root=outputs/quick_tables
store=experiments/results/quick_tables
q=(preset=quick hydra.mode=RUN)
# finish <table> <run...>: the table's runs kept in the store, its report rebuilt there
finish() {
  local t=$1; shift
  keep "$root/$t" "$store/$t" "$@"
  python -m src.report "$store/$t" > /dev/null
  echo "quick_tables: $t kept in $store/$t"
}
for m in resnet110 vgg15; do
  run "$root/fig3/$m" experiment=delete_single "${q[@]}" model=$m
done
finish fig3 resnet110 vgg15
ckpt=$root/fig3/resnet110/checkpoints/last.ckpt  # Figs 5a, 5b, 6 and 8 analyse this network
run "$root/fig5/resnet110" experiment=delete_many train=false ckpt_path="$ckpt" \
  +lesion@callbacks.reorder=reorder
finish fig5 resnet110
run "$root/fig6/resnet110" experiment=gradient_paths train=false ckpt_path="$ckpt" \
  callbacks.gradient_paths.samples=20 callbacks.gradient_paths.batches=4
finish fig6 resnet110
run "$root/fig8/stochastic_depth" experiment=stochastic_depth "${q[@]}" training=stochastic_depth
finish fig8 stochastic_depth
run "$root/fig4/resnet200" experiment=imagenet_delete_single "${q[@]}"
finish fig4 resnet200
runs=()
for seed in 0 1 2 3; do  # the sweep of conf/paths_analysis/effective_paths_size/preset_quick.yaml
  for k in 4 9; do
    run "$root/sec5/k${k}_seed$seed" experiment=effective_paths "${q[@]}" training=block_subset \
      training.k=$k seed=$seed
  done
  run "$root/sec5/k4_seed${seed}_rescale" train=false \
    ckpt_path="$root/sec5/k4_seed$seed/checkpoints/last.ckpt" training=block_subset \
    training.test_mode=rescale
  runs+=(k4_seed$seed k9_seed$seed k4_seed${seed}_rescale)
done
finish sec5 "${runs[@]}"
