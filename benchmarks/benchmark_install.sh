#!/usr/bin/env bash
# The venv install of `make setup`, two ways, alternated (A B B A ...): pip byte-compiling as it
# installs (its default, serial) against `pip --no-compile` then `compileall -j 0` (the Makefile's).
# Same lock, fresh venv each time; prints seconds per way and the ratio, writes JSON.
#   bash benchmarks/benchmark_install.sh benchmarks/cpu-<date>/install.json [rounds]
set -euo pipefail
out=${1:?usage: benchmark_install.sh OUT.json [rounds]}
rounds=${2:-2}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_install=(-m pip install --quiet --disable-pip-version-check -r requirements.txt)
exclude='torch/testing/_internal/py312_intrinsics'

install() {  # $1: pip_compiles | compileall; prints wall seconds
  rm -rf "$work/venv" && python3 -m venv "$work/venv"
  local start=$SECONDS
  if [[ $1 == pip_compiles ]]; then
    "$work/venv/bin/python" "${pip_install[@]}"
  else
    "$work/venv/bin/python" "${pip_install[@]}" --no-compile
    "$work/venv/bin/python" -m compileall -q -j 0 -x "$exclude" "$work/venv/lib" >/dev/null
  fi
  echo $((SECONDS - start))
}

declare -A times=([pip_compiles]="" [compileall]="")
for ((r = 0; r < rounds; r++)); do
  order=(pip_compiles compileall)
  ((r % 2)) && order=(compileall pip_compiles)
  for way in "${order[@]}"; do
    s=$(install "$way")
    echo "round $r $way: $s s"
    times[$way]+="$s "
  done
done
python3 - "$out" "${times[pip_compiles]}" "${times[compileall]}" <<'PY'
import datetime, json, os, statistics, sys
out, a, b = sys.argv[1], [int(x) for x in sys.argv[2].split()], [int(x) for x in sys.argv[3].split()]
result = {
    "what": "fresh venv + pip install -r requirements.txt, alternated; seconds of wall time",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "cpu_count": os.cpu_count(), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    "pip_compiles_seconds": a, "no_compile_then_compileall_seconds": b,
    "ratio_of_medians": round(statistics.median(b) / statistics.median(a), 3),
}
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
json.dump(result, open(out, "w"), indent=1)
print(json.dumps(result))
PY
