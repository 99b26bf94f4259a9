# Shared by the measurement scripts of experiments/ (sourced, not run): one run per folder,
# resumable, and its results kept in a committed store without checkpoints.
#   run <dir> <overrides...>     one `python -m src.run` in <dir>; skipped once it has finished
#                                (metrics.json), resumed (resume=true) where an earlier session
#                                was cut off mid-training with a checkpoint
#   keep <root> <store> <run...> each run's metrics.json, overrides, the precision it chose
#                                (precision.txt), analysis/*.parquet and the studies' headline
#                                numbers (analysis/summary.json: e.g. the full gradient's norm
#                                beside the exact decomposition), from <root>/<run> to
#                                <store>/<run>; `python -m src.report <store>` reads them as runs
run() {
  local dir=$1; shift
  if [ -f "$dir/metrics.json" ]; then return; fi
  local again=(); [ -d "$dir/checkpoints" ] && again=(resume=true)
  python -m src.run "$@" "${again[@]}" hydra.run.dir="$dir"
}
keep() {
  local root=$1 store=$2; shift 2
  for r in "$@"; do
    mkdir -p "$store/$r/analysis"
    cp "$root/$r/metrics.json" "$root/$r/.hydra/overrides.yaml" "$store/$r/"
    grep -h -m1 "src.run.*precision" "$root/$r/run.log" | sed 's/^.* - //' > "$store/$r/precision.txt" || true
    if compgen -G "$root/$r/analysis/*.parquet" > /dev/null; then
      cp "$root/$r"/analysis/*.parquet "$store/$r/analysis/"
    fi
    if [ -f "$root/$r/analysis/summary.json" ]; then cp "$root/$r/analysis/summary.json" "$store/$r/analysis/"; fi
  done
}
