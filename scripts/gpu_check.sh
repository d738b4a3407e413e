#!/usr/bin/env bash
# The GPU fast paths end to end, on one CUDA GPU in under 5 minutes (issue #9):
#   1. every architecture trains a few steps in bf16 with torch.compile, and no step recompiles;
#   2. MNIST to 99% test accuracy with the data on the GPU (target: 2 s of training or less);
#   3. a GPT-2-small shape (12 layers, 12 heads, 768 wide, context 1024): MFU (target: 40% or
#      more on an H100/H200-class GPU), and the operators that take its GPU time;
#   4. the convolutional models' step in each memory layout and precision: what
#      device.channels_last=auto and bf16 buy on CUDA (issue #8), airbench_cifar10's ResNet too;
#   5. model.activation_checkpointing and model.lora_rank at the GPT-2-small shape: memory kept,
#      gradients and optimizer state, peak, step time.
# Figures go to stdout and to $OUT/gpu_check.json; record them in BENCHMARKS.md with the date.
#
#   scripts/gpu_check.sh [MNIST_ROOT]   MNIST_ROOT/MNIST/raw holds the four MNIST files (default
#                                       data, the folder `train data=mnist` downloads to)
#   SMOKE=1 scripts/gpu_check.sh        the same steps, tiny and on the CPU: checks the script
# Needs the project installed as the README says (on a bare GPU machine with torch: pip install
# the hydra-core, omegaconf and antlr4 wheels, then pip install --no-deps -e .).
set -euo pipefail
root=${1:-data}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if [[ ${SMOKE:-0} == 1 ]]; then
  device=(device=cpu device.compile=false); steps=4; gpt=(model.width=32 model.depth=1
  model.heads=2 data.block_size=32 data.batch_size=4); mnist=(trainer.max_steps=20)
  layout=(--device cpu --steps 3); recompute=(--device cpu --depth 2 --width 64 --context 64)
else
  device=(device=cuda device.compile=true); steps=30; gpt=(model.width=768 model.depth=12
  model.heads=12 data.block_size=1024 data.batch_size=16); mnist=()
  layout=(--device cuda --steps 30)
  recompute=(--device cuda --depth 12 --width 768 --context 1024 --batch 16 --steps 5)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
quiet=(logger=tensorboard trainer.progress=false)
# A text of a few MB for the language models: this repository's own sources, repeated.
cat README.md src/trainer/*.py src/trainer/*/*.py > "$out/one.txt"
for _ in $(seq 20); do cat "$out/one.txt"; done > "$out/text.txt"

echo "== 1. every architecture, ${device[*]}, precision auto (bf16 on Ampere and later)"
for model in cnn rnn transformer gan autoencoder transformer-text; do
  data=(data=digits); [[ $model == transformer-text ]] && data=(data=text "data.path=$out/text.txt")
  TORCH_LOGS=recompiles train "model=${model%-text}" "${data[@]}" "${device[@]}" "${quiet[@]}" \
    trainer.max_steps=$steps trainer.val_every=$((steps / 2)) trainer.log_every=5 \
    "hydra.run.dir=$out/$model" 2> "$out/$model.log"
  echo "$model: $(grep -c 'Recompiling' "$out/$model.log" || true) recompiles," \
    "$(tr -d '\n ' < "$out/$model/metrics.json")"
done

echo "== 2. MNIST to 99% test accuracy, the data on the device"
train experiment=cnn_mnist "data.root=$root" data.download=false "${device[@]}" "${quiet[@]}" \
  trainer.epochs=2 data.batch_size=256 optimizer.lr=0.003 trainer.max_validations=1 \
  trainer.log_every=10 "${mnist[@]}" "hydra.run.dir=$out/mnist" 2> "$out/mnist.log"

echo "== 3. GPT-2-small shape: 12 layers, 12 heads, 768 wide, context 1024, batch 16"
train model=transformer data=text "data.path=$out/text.txt" "${gpt[@]}" "${device[@]}" \
  "${quiet[@]}" trainer.max_steps=$((steps * 2)) trainer.log_every=10 trainer.val_every=1000 \
  trainer.eval_batches=2 trainer.profile=5 "hydra.run.dir=$out/gpt2" 2> "$out/gpt2.log"
# Steps 3-7 are profiled (the table is in the log above): inside the first report, which the
# MFU figure leaves out as it holds compiling.

echo "== 4. convolutions: contiguous and channels-last, float32 and bf16"
python scripts/benchmark_conv_layout.py "${layout[@]}" --json "$out/conv_layout.json"

echo "== 5. activation checkpointing and LoRA (the GPT-2-small shape; each case a fresh process)"
python scripts/benchmark_memory.py "${recompute[@]}" --rounds 1 --json "$out/memory.json"

python scripts/gpu_check_report.py "$out"
