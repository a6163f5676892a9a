#!/usr/bin/env bash
# The GPU code paths, each run for real on a small budget, with a table of what ran and what it cost:
#   bf16 single GPU (data, SFT, reward, PPO, eval), QLoRA (4-bit NF4 base via bitsandbytes) SFT and PPO,
#   DeepSpeed ZeRO-2 and ZeRO-3 SFT, ZeRO-2 PPO, FSDP SFT (all through `accelerate launch`, 1 process).
#
#   bash bench/gpu_paths.sh [WORK_DIR]        (needs one CUDA GPU; bitsandbytes and deepspeed installed)
#
# Every step runs even when an earlier one failed; the table at the end says which passed. The figures
# (seconds per step, GPU peak) come from each stage's own metrics files under WORK_DIR.
set -u
W=${1:-/tmp/rec-rlhf-gpu}
PY=${PYTHON:-python3}
RECIPE=${RECIPE:-recipes/demo.yaml}
BF16=(model.dtype=${DTYPE:-bfloat16})   # DTYPE=float32 ACCEL=cpu.yaml RECIPE=recipes/tiny.yaml: a CPU dry run
rm -rf "$W" && mkdir -p "$W"
declare -a NAMES RCS SECS

step() {   # step NAME cmd...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > "$W/$name.log" 2>&1
  local rc=$?
  NAMES+=("$name"); RCS+=("$rc"); SECS+=($((SECONDS - t0)))
  tail -n 3 "$W/$name.log"
  [ "$rc" = 0 ] || { echo "--- $name failed (rc $rc); last lines:"; tail -n 25 "$W/$name.log"; }
}
launch() {  # launch ACCEL_CONFIG STAGE RUN overrides...
  local cfg=${ACCEL:-$1} stage=$2 run=$3; shift 3
  $PY -m accelerate.commands.launch --config_file "accelerate_configs/$cfg" --num_processes 1 \
    -m rlhf "$stage" --run "$run" --config "$RECIPE" "${BF16[@]}" "$@"
}
share() {   # a run dir that reuses another's finished stages: share SRC DST parts...
  local src=$1 dst=$2; shift 2
  mkdir -p "$dst"
  for part in "$@"; do ln -s "$src/$part" "$dst/$part"; done
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, trl, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"

B=$W/bf16
step data        $PY -m rlhf data prepare --out "$B" --config "$RECIPE"
step bf16_sft    launch single_gpu.yaml sft    "$B" sft.max_steps=40 sft.batch_size=16
step bf16_reward launch single_gpu.yaml reward "$B" reward.max_steps=60 reward.batch_size=16 reward.layers=0
step bf16_ppo    launch single_gpu.yaml ppo    "$B" ppo.total_updates=6 ppo.batch_size=32 ppo.mini_batches=2 ppo.value_layers=0
step bf16_eval   launch single_gpu.yaml eval   "$B" eval.max_users=80 eval.batch_size=40

Q=$W/qlora; share "$B" "$Q" data reward
step qlora_sft   launch single_gpu.yaml sft "$Q" model.load_in_4bit=true sft.max_steps=40 sft.batch_size=16
step qlora_ppo   launch single_gpu.yaml ppo "$Q" model.load_in_4bit=true ppo.total_updates=3 ppo.batch_size=32 ppo.value_layers=0

for z in 2 3; do
  Z=$W/zero$z; share "$B" "$Z" data
  step "zero${z}_sft" launch "deepspeed_zero$z.yaml" sft "$Z" sft.max_steps=20 sft.batch_size=16 sft.num_samples=2
done
Z=$W/zero2p; share "$B" "$Z" data sft reward
step zero2_ppo   launch deepspeed_zero2.yaml ppo "$Z" ppo.total_updates=3 ppo.batch_size=32 ppo.value_layers=0
F=$W/fsdp; share "$B" "$F" data
step fsdp_sft    launch fsdp.yaml sft "$F" sft.max_steps=20 sft.batch_size=16 sft.num_samples=2

echo
echo "step          rc  seconds  figures"
for i in "${!NAMES[@]}"; do
  n=${NAMES[$i]}
  fig=$($PY - "$W" "$n" <<'PYEOF'
import json, sys
from pathlib import Path
w, name = Path(sys.argv[1]), sys.argv[2]
run = {"bf16": "bf16", "qlora": "qlora", "zero2": "zero2", "zero3": "zero3", "fsdp": "fsdp"}.get(name.split("_")[0])
stage = name.split("_")[-1]
if name == "zero2_ppo":
    run = "zero2p"
if run is None:
    sys.exit()
d = w / run / stage
try:
    if stage in ("sft", "reward"):
        m = json.loads((d / "metrics.json").read_text())
        extra = (f"loss {m['first_loss']:.2f}->{m['last_loss']:.2f}, valid {m['samples_after']['valid_rate']:.2f}"
                 if stage == "sft" else f"held-out acc {m['val_accuracy']:.3f}")
        steps = m["steps"]
        print(f"{m['seconds'] / max(steps, 1):.2f} s/step x {steps}, GPU peak {m['gpu_peak_gb']} GB, {extra}")
    elif stage == "ppo":
        rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        last = rows[-1]
        print(f"{sorted(r['time/update_s'] for r in rows)[len(rows) // 2]:.1f} s/update x {len(rows)} (median), "
              f"GPU peak {last.get('memory/gpu_peak_gb')} GB, score {rows[0]['objective/scores']:.2f}->{last['objective/scores']:.2f}, "
              f"KL {last['objective/kl']:.2f}")
    elif stage == "eval":
        m = json.loads((d / "metrics.json").read_text())
        print("; ".join(f"{s}: valid {v.get('valid_rate', 0):.2f} true_utility {v.get('true_utility', 0):.3f}"
                        for s, v in m.get("stages", m).items() if isinstance(v, dict) and "valid_rate" in v))
except (OSError, KeyError, ValueError, IndexError, TypeError) as e:
    print(f"(no figures: {e!r})")
PYEOF
)
  printf "%-13s %3s %8s  %s\n" "$n" "${RCS[$i]}" "${SECS[$i]}" "$fig"
done
