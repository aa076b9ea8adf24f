# Shared by the device scripts (source it from the repository root): OUT made absolute, the tree on PYTHONPATH, and
# `step NAME SECONDS COMMAND...`, which runs COMMAND under a time limit with its whole log appended to $OUT/NAME.log
# (tee: a call stopped at its limit still returns what is under $OUT) and its last 30 lines printed.
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() {
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" 2>&1 | tee -a "$OUT/$name.log" | tail -n 30
}
