#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go, on one machine:
#   bash tests/benchmarks/gpu_checks.sh TAG          (TAG names the GPU, e.g. h100)
# 1. sampling throughput, vLLM against transformers (transformers alone where vLLM is not installed),
#    at 16 and 512 premises            -> tests/benchmarks/results/sample_throughput-TAG.json
# 2. single-GPU sampling wall time of the scale-out premises
#                                       -> tests/benchmarks/results/scale_out-TAG.json
# 3. the strategy experiment at a larger budget (sampling, DPO training in bf16, evaluation on the GPU)
#                                       -> outputs/experiments/smollm2-strategies-gpu/results.md
# 4. sempa embed of 20k SNLI sentences, transformers against vLLM's pooling runner (their agreement too)
#                                       -> tests/benchmarks/results/embed_corpus_throughput-TAG.json
# SEMPA overrides the command that runs the CLI (default: sempa). Exits non-zero if any step failed;
# the other steps still run.
set -u -o pipefail
tag=${1:?usage: gpu_checks.sh TAG}
sempa=${SEMPA:-sempa}
here=$(dirname "$0")
status=0
backends=vllm,transformers
python3 -c "import vllm" 2>/dev/null || { backends=transformers; echo "vLLM is not importable here: transformers backend only"; }

python3 "$here/sample_throughput.py" --backends "$backends" --sizes 16,512 --batch-size 64 --tag "$tag" || status=1
python3 "$here/scale_out.py" --workers 0 --tag "$tag" || status=1
$sempa experiment sempa_train/configs/experiments/smollm2_strategies_gpu.yaml -v || status=1
python3 "$here/embed_corpus_throughput.py" --backends "$backends" --sentences 20000 --tag "$tag" || status=1
exit $status
