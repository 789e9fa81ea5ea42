"""The training engine: SFT, reward-model and PPO on plain PyTorch + transformers + DeepSpeed.

A library: it never imports dagster, mlflow or pandera. Metrics leave through
:class:`ppo_core.callbacks.Callback`.
"""
