#!/usr/bin/env bash
# Value-based PPO at cluster scale with OpenRLHF, against the reward model mars_ray serves.
#
# 1. Serve the MARS reward model on the cluster (OpenRLHF posts without a bearer token, so this
#    deployment has none, which a server on 0.0.0.0 refuses unless told: keep port 8000 inside the
#    cluster's private network):
#
#      ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml --working-dir . --no-wait -- mars-ray serve --config jobs/cluster/serve.yaml --serve.auth_token_env null --serve.allow_unauthenticated true --model /mnt/shared/mars_ray/runs/ultrafeedback-20k-qwen1.5b-mars
#
# 2. Run this script from the repository root with the head node's address in HEAD_IP (the
#    address the GPU workers reach the Serve proxy on) and the dashboard on 127.0.0.1:8265.
#    OpenRLHF's rollout workers POST {"query": [...], "prompts": [...], "labels": [...]} to
#    /get_reward and read "rewards" / "scores": the schema `mars-ray serve` speaks.
#
# 2 nodes x 8 GPUs: actor 8 GPUs (ZeRO-2, LoRA r=16/alpha=32), critic 2, reference colocated with
# the actor, 4 vLLM engines: 14 GPUs, beside the 2 reward replicas of step 1 (OpenRLHF 0.11.2 reserves
# one {GPU: 1, CPU: 1} bundle per GPU of each group; `mars-ray cluster-check` and the gpu_sim test check
# the sum). The reward model is remote (no reward GPUs here). KL 0.02, clip 0.2.
set -euo pipefail
: "${HEAD_IP:?set HEAD_IP to the address of the head node}"
POLICY="${POLICY:-meta-llama/Llama-3.2-1B-Instruct}"
PROMPTS="${PROMPTS:-/mnt/shared/mars_ray/data/openrlhf/prompts.jsonl}"   # {"prompt": ...} per line
OUT="${OUT:-/mnt/shared/mars_ray/openrlhf/ppo-llama3.2-1b-mars}"

ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/openrlhf/runtime_env.yaml --no-wait -- python3 -m openrlhf.cli.train_ppo_ray --actor.num_nodes 1 --actor.num_gpus_per_node 8 --ref.num_nodes 1 --ref.num_gpus_per_node 8 --train.colocate_actor_ref --critic.num_nodes 1 --critic.num_gpus_per_node 2 --vllm.num_engines 4 --vllm.tensor_parallel_size 1 --actor.model_name_or_path "$POLICY" --critic.model_name_or_path "$POLICY" --reward.remote_url "http://$HEAD_IP:8000/get_reward" --data.prompt_dataset "$PROMPTS" --data.input_key prompt --data.apply_chat_template --data.max_len 768 --rollout.max_new_tokens 256 --rollout.batch_size 256 --rollout.micro_batch_size 16 --rollout.n_samples_per_prompt 1 --rollout.temperature 1.0 --train.batch_size 128 --train.micro_batch_size 8 --train.max_epochs 1 --train.num_episodes 1 --algo.advantage.estimator gae --algo.kl.init_coef 0.02 --actor.eps_clip 0.2 --critic.value_clip 0.5 --actor.adam.lr 1e-6 --critic.adam.lr 9e-6 --ds.zero_stage 2 --ds.param_dtype bf16 --ds.lora.rank 16 --ds.lora.alpha 32 --reward.normalize_enable --ckpt.output_dir "$OUT" --ckpt.path "$OUT/ckpt" --ckpt.save_steps 50 --logger.logging_steps 1
