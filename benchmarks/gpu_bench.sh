#!/usr/bin/env bash
# Paper-scale timings on one GPU, in one call (a lent GPU is short-lived: everything that belongs together).
#
#     bash benchmarks/gpu_bench.sh [OUT_DIR]   # default results/gpu; OUT_DIR.tgz (or $PACK) rewritten after each part
#
# 1. the machine: nvidia-smi, torch, the bf16 matmul peak (inside part 2's output);
# 2. the papers' settings timed (configs/efficiency/paper-settings.yaml): CMD at 512x1024x16 against the
#    ModelScope-sized 3D UNet, PVDM-L at 256x256x16 against the pixel VDM; sampling seconds (decoders in and
#    out), achieved TFLOP/s, peak memory, one training step per stage at batch 1;
# 3. every method at scale=paper on shapes (64x64x16), timed: benchmarks.efficiency's usual table;
# 4. every method trained and evaluated end to end at scale=test through Lightning on the GPU (does it run?).
# Each part has its own time limit (seconds: PAPER_S, SCALE_S, SMOKE_S) so one slow part cannot starve the rest.
set -u
out=${1:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pack() { tar czf "${PACK:-$out.tgz}" -C "$(dirname "$out")" "$(basename "$out")" 2>/dev/null || true; }
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; } | tee "$out/machine.txt"

timeout "${PAPER_S:-270}" python3 -m benchmarks.efficiency preset=paper-settings timing=on repeats=3 \
    settings=cmd,modelscope,pvdm,vdm-pixel,cmd-50-motion-steps \
    out="$out/paper" 2>&1 | tee "$out/paper.log"
pack
echo "[gpu_bench] papers' settings done at $(( $(date +%s) - t0 )) s"

timeout "${SCALE_S:-120}" python3 -m benchmarks.efficiency scale=paper repeats=3 out="$out/scale_paper" 2>&1 \
    | tee "$out/scale_paper.log"
pack
echo "[gpu_bench] scale=paper done at $(( $(date +%s) - t0 )) s"

smoke_end=$(( $(date +%s) + ${SMOKE_S:-75} ))
for m in cmd pvdm videofusion edvdm dvdm vdm; do
    left=$(( smoke_end - $(date +%s) ))
    if [ "$left" -le 5 ]; then echo "smoke $m: not run (time)" | tee -a "$out/smoke.txt"; continue; fi
    s=$(date +%s)
    timeout "$left" python3 -m benchmarks.run method="$m" scale=test trainer.accelerator=gpu \
        run_dir="$out/smoke-$m" > "$out/smoke-$m.log" 2>&1
    echo "smoke $m: exit $? in $(( $(date +%s) - s )) s: $(grep -E 'on shapes:|Error' "$out/smoke-$m.log" | tail -2 | tr '\n' ' ')" \
        | tee -a "$out/smoke.txt"
done
pack
echo "[gpu_bench] all done at $(( $(date +%s) - t0 )) s"
