"""MLflow 3 logged models, datasets and model-linked metrics, shared by the model, evaluation and
registry assets (a module of its own so that none of them imports another).

* A training run logs its final ``save_pretrained`` directory as a LoggedModel with the
  transformers flavor (``log_transformers_model``); its id (``models:/<model_id>``) goes into the
  asset manifest and the registry registers versions from it.
* The split files a run reads are logged as its dataset inputs, named after the split, with the
  data version as digest (``split_inputs`` / ``log_datasets``), so a run shows which data it saw.
* Evaluation metrics are logged with the evaluated model's id and the dataset they were measured
  on (``model_metrics``), so they appear on the model's page as well as on the run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Auto classes the transformers flavor pipelines need, per pipeline task.
TASK_MODEL_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
}
# Pipeline task of each ppo_core stage's final model.
STAGE_TASKS = {"sft": "text-generation", "reward": "text-classification", "ppo": "text-generation"}
LOGGED_MODEL_PREFIX = "models:/"
TRAINING, EVAL = "training", "eval"


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model.

    Explicit, because MLflow's inference for the transformers flavor asks for torchvision,
    which this project neither needs nor installs.
    """
    import tokenizers
    import torch
    import transformers

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"tokenizers=={tokenizers.__version__}",
        "safetensors",
    ]


def load_components(model_dir: str | Path, task: str) -> dict[str, Any]:
    """Model and tokenizer of a ``save_pretrained`` directory, as the transformers flavor takes them.

    Loaded objects rather than the path: MLflow's path-based logging reads the pipeline class
    from transformers' task registry, which transformers 5 fills lazily with class names.
    """
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: not a save_pretrained directory (no config.json); "
            "re-materialize the model asset that produced it"
        )
    if task not in TASK_MODEL_CLASSES:
        raise ValueError(f"task {task!r}: expected one of {sorted(TASK_MODEL_CLASSES)}")
    auto = getattr(transformers, TASK_MODEL_CLASSES[task])
    model = auto.from_pretrained(model_dir, trust_remote_code=False, use_safetensors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return {"model": model, "tokenizer": tokenizer}


def log_transformers_model(
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    name: str,
    task: str,
) -> str:
    """Log a ``save_pretrained`` directory as a LoggedModel of the run ``run_id``; returns
    ``models:/<model_id>``.

    The run is named rather than made active with ``mlflow.start_run``, whose exit would end it
    while its asset still logs to it. Without an active run the flavor would file the model
    under the process's active experiment (the Default one, artifacts under ./mlruns), so the
    model is created here, in the run's experiment, and the flavor fills it.
    """
    import mlflow

    from ppo_core.models import implicit_reward_spec

    # an implicit reward model is a causal LM: logged as one, its beta and reference model in
    # the LoggedModel's metadata (MLmodel), as PPO needs them to score with it
    spec = implicit_reward_spec(model_dir)
    if spec is not None and task == "text-classification":
        task = "text-generation"
    components = load_components(model_dir, task)
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    # the run's params, as the flavor gives a model it creates itself
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       params=dict(run.data.params))
    with process_uris(tracking_uri):  # the flavor resolves its store from the process-wide URIs
        info = mlflow.transformers.log_model(
            transformers_model=components,
            name=name,
            task=task,
            pip_requirements=pip_requirements(),
            run_id=run_id,
            model_id=model.model_id,
            metadata={"implicit_reward": spec} if spec is not None else None,
        )
    return info.model_uri


@contextmanager
def process_uris(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to ``uri`` for the body, then put
    back. ``mlflow.set_tracking_uri`` / ``set_registry_uri`` also export ``MLFLOW_TRACKING_URI``
    / ``MLFLOW_REGISTRY_URI``, which every later subprocess (a training stage, a server, another
    store's command) would otherwise inherit."""
    import os

    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None: MLflow's default again
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def logged_model_id(model_uri: str) -> str | None:
    """``m-...`` of a ``models:/<model_id>`` URI; None for a registry or run URI."""
    rest = model_uri.removeprefix(LOGGED_MODEL_PREFIX)
    if not model_uri.startswith(LOGGED_MODEL_PREFIX) or "/" in rest or "@" in rest:
        return None
    return rest


def version_model_id(version: Any) -> str | None:
    """The LoggedModel a registered version was created from.

    The SQL registry store (MLflow 3.17) keeps no ``model_id`` column, so ``version.model_id``
    is None there and the link is the version's source, ``models:/<model_id>`` (what the UI
    reads to show the source model); stores that keep the field return it.
    """
    return getattr(version, "model_id", None) or logged_model_id(str(version.source or ""))


def process_tracking_uri(client: Any) -> Any:
    """``process_uris`` of ``client``'s store: the SQL registry store resolves a
    ``models:/<model_id>`` source through an ``MlflowClient()`` of the process-wide URI, not
    through the client that registers."""
    return process_uris(client.tracking_uri)


@dataclass(frozen=True)
class SplitInput:
    """One split file a run reads, as an MLflow dataset input."""

    name: str      # split name (``sft_train``), the dataset's name in MLflow
    path: str      # the parquet file, the dataset's source
    context: str   # "training" or "eval"
    digest: str    # the data version of dataset_splits


def split_inputs(splits: Mapping[str, Any], contexts: Mapping[str, str]) -> list[SplitInput]:
    """The ``dataset_splits`` files named in ``contexts`` (split name -> context)."""
    split_dir = Path(str(splits["split_dir"]))
    digest = str(splits.get("data_version", "unknown"))
    return [SplitInput(name, str(split_dir / f"{name}.parquet"), context, digest)
            for name, context in contexts.items()]


def _dataset(split: SplitInput) -> Any:
    import mlflow.data
    import pandas as pd

    with warnings.catch_warnings():
        # Two registered local sources both claim a file path; either one is right.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(pd.read_parquet(split.path), source=split.path,
                                       name=split.name, digest=split.digest)


def log_datasets(client: Any, run_id: str, splits: Sequence[SplitInput]) -> None:
    """Log ``splits`` as dataset inputs of ``run_id`` (schema and row count read from the files)."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = [DatasetInput(_dataset(s)._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", s.context)])
              for s in splits]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def model_metrics(
    metrics: Mapping[str, float], model_id: str, dataset: SplitInput | None = None, step: int = 0,
) -> list[Any]:
    """``Metric`` entities of ``metrics`` linked to a logged model (and the dataset they were
    measured on): logged with ``log_batch`` they land on the run and on the model's page."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    name, digest = (dataset.name, dataset.digest) if dataset is not None else (None, None)
    return [Metric(k, float(v), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
            for k, v in metrics.items()]


def link_version_to_model(client: Any, name: str, version: str, model_id: str) -> None:
    """List the registered version on the logged model (its "Registered versions" in the UI), as
    ``mlflow.register_model`` does; ``create_model_version`` records only the other direction."""
    import json

    key = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS
    existing = client.get_logged_model(model_id).tags.get(key)
    versions = json.loads(existing) if existing else []
    entry = {"name": name, "version": str(version)}
    if entry not in versions:
        client.set_logged_model_tags(model_id, {key: json.dumps([*versions, entry])})
