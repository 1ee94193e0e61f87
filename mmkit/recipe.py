"""Recipes: YAML -> typed dataclasses, with ``base:`` inheritance and dotted overrides.

A recipe is the single source of truth of a run: which parts make the model, how images and
text are processed, which stages train what. ``load_recipe(path, overrides)`` reads it;
every validation error is one line that names the key path and, for typos, the closest key:

    RecipeError: recipes/x.yaml: stages[1].lr.llm: expected a number, got 'fast'
    RecipeError: recipes/x.yaml: model.conector: unknown key; did you mean 'connector'?
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from mmkit.registry import UnknownNameError, closest
from mmkit.registry import plugins as plugin_registry

log = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A malformed recipe. The message names the file and the key path."""


# --------------------------------------------------------------------------- schema


@dataclass
class VisionConfig:
    """The vision encoder. ``name`` is a key of ``mmkit.registry.encoders``."""

    name: str = "clip"
    pretrained: Optional[str] = None  # hub id or local directory; None = random init from `config`
    config: dict = field(default_factory=dict)  # encoder config fields for random init
    feature_layer: int = -2  # hidden state to take (-2: output of the second-to-last block)
    select: Literal["patch", "cls_patch"] = "patch"  # patch drops CLS (ignored by encoders without CLS)


@dataclass
class ConnectorConfig:
    """The connector. ``name`` is a key of ``mmkit.registry.connectors`` (identity, linear, mlp2x_gelu, ...)."""

    name: str = "mlp2x_gelu"
    bias: bool = True


@dataclass
class LLMConfig:
    """The language model. ``name`` is a preset of ``mmkit.registry.llms`` (llama, vicuna, mistral, qwen2, auto)."""

    name: str = "llama"
    pretrained: Optional[str] = None  # hub id or local directory; None = random init from `config`
    config: dict = field(default_factory=dict)  # transformers config fields for random init
    # hub id / directory; defaults to `pretrained`; "builtin:NAME" = NAME in mmkit.registry.tokenizers
    tokenizer: Optional[str] = None
    attn_implementation: Optional[str] = None  # e.g. "sdpa", "eager"


@dataclass
class ImageConfig:
    """How an image becomes pixels and how many tokens it becomes."""

    aspect_ratio: Literal["square", "pad", "anyres"] = "pad"  # square: resize+center-crop; pad: expand to square
    anyres_max: Optional[int] = None  # OneVision anyres_max_N; None = no downscale
    grid_pinpoints: list = field(default_factory=list)  # anyres resolutions as stored: [h, w] (hf) / [w, h] (orig)
    merge: Literal["flat", "spatial_unpad"] = "flat"
    convention: Literal["hf", "orig"] = "hf"  # AnyRes tie-break / rounding convention
    backend: Literal["pil", "fast"] = "fast"  # fast: torch tensors (= transformers default processors); pil: PIL (= original repo)
    image_size: Optional[int] = None  # defaults to the encoder's input size
    mean: Optional[list] = None  # defaults to the encoder's normalisation constants
    std: Optional[list] = None


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    template: Optional[str] = None  # conversation template; None = the LLM preset's default
    system_prompt: Optional[str] = None  # replaces the template's system prompt ("" = none); None = template's
    image_token: str = "<image>"
    image_token_id: Optional[int] = None  # defaults to the tokenizer's id of image_token
    video_token: str = "<video>"  # the placeholder of a video in prompts (OneVision)
    video_token_id: Optional[int] = None  # video frames (OneVision); None = no video support
    max_length: int = 2048
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    kernels: Literal["auto", "triton", "torch"] = "auto"


@dataclass
class DataSource:
    """One source of a mixture: LLaVA JSON/JSONL, a Hugging Face ``datasets`` directory or Parquet files (Arrow),
    WebDataset tar shards, or ``NAME:ARG`` for a source in mmkit.registry.data_sources (mmkit.data.dataset)."""

    path: str = ""  # .json / .jsonl, a directory, .parquet, .tar, shard-{000..009}.tar, or e.g. "shapes:auto"
    # null: told from the path (a save_to_disk directory or *.parquet: arrow; *.tar: webdataset; else llava)
    kind: Optional[Literal["llava", "arrow", "webdataset"]] = None
    image_folder: Optional[str] = None
    weight: Optional[float] = None  # sampling weight in a mixture
    count: Optional[int] = None  # or an exact number of samples drawn from it


@dataclass
class ImageLimitsConfig:
    """Per-image limits for training data (``mmkit.processing.budget``); null = the budget's default (20 MiB
    encoded, 50 MP decoded, aspect ratio 50:1, 100 MP after resize/pad). An image over one is a counted skip."""

    max_bytes: Optional[int] = None
    max_pixels: Optional[int] = None
    max_aspect: Optional[float] = None  # long side / short side
    max_resized_pixels: Optional[int] = None  # the largest buffer the preprocessing allocates after resize/pad

    def check(self, where: str) -> None:
        for key in ("max_bytes", "max_pixels", "max_resized_pixels"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"{where}.{key}: expected a positive integer (or null for the default), "
                                  f"got {value!r}")
        if self.max_aspect is not None and not self.max_aspect >= 1:  # NaN fails too
            raise RecipeError(f"{where}.max_aspect: expected a number >= 1 (long side / short side; or null for the "
                              f"default), got {self.max_aspect!r}")


@dataclass
class VideoConfig:
    """How the frames of training ``video`` records are sampled (``mmkit.processing.video``): ``num_frames``
    spread uniformly over the video, or, with ``fps`` set, one frame every 1/fps seconds capped at
    ``max_frames``. null limits = the decoder's defaults (512 MiB encoded, 20000 frames decoded per video); each
    frame is held to ``data.image_limits``. A video over a limit or that cannot be decoded is a counted skip."""

    num_frames: int = 8
    fps: Optional[float] = None
    max_frames: int = 32
    max_bytes: Optional[int] = None
    max_decode_frames: Optional[int] = None
    # LLaVA-Video's time instruction after the placeholder: the duration and the sampled frames' timestamps
    time_instruction: bool = False

    def check(self, where: str) -> None:
        for key in ("num_frames", "max_frames", "max_bytes", "max_decode_frames"):
            value = getattr(self, key)
            if value is None and key in ("max_bytes", "max_decode_frames"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"{where}.{key}: expected a positive integer, got {value!r}")
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))
                                     or not self.fps > 0 or self.fps == float("inf")):  # NaN fails too
            raise RecipeError(f"{where}.fps: expected a positive number of frames per second (or null for "
                              f"num_frames spread uniformly), got {self.fps!r}")


@dataclass
class DataConfig:
    """Training data of a run or a stage: sources, how bad records are handled, batch order, loading, packing."""

    sources: list[DataSource] = field(default_factory=list)
    strict: bool = False  # raise on bad records instead of skipping them with a counted warning
    group_by_modality_length: bool = False
    # DataLoader worker processes per training process: 0 = load in the training process; None = a default from
    # the CPU count and the world size, min(4, max(0, cpus // world_size - 1)) (mmkit.data.loader)
    num_workers: Optional[int] = None
    prefetch_factor: int = 2  # micro-batches each worker loads ahead
    # pack each micro-batch's samples into rows of at most pack_length tokens (mmkit.data.packing); which samples
    # make a step is unchanged. pack_length: None = model.max_length; never below it (samples are fitted to
    # model.max_length, so every sample fits a row)
    packing: bool = False
    pack_length: Optional[int] = None
    # micro-batches sized by a token budget instead of per_device_batch_size: each process cuts its share of a
    # step's samples into micro-batches of at most this many positions (padded rows x longest, or packed rows x
    # longest row); the samples of a step are unchanged. None = per_device_batch_size samples per micro-batch
    batch_by_tokens: Optional[int] = None
    image_limits: ImageLimitsConfig = field(default_factory=lambda: ImageLimitsConfig())
    video: VideoConfig = field(default_factory=lambda: VideoConfig())

    def check(self, where: str, max_length: int | None = None) -> None:
        """Value ranges; each error names its key path under ``where`` (e.g. ``stages[1].data``).
        ``max_length``: the recipe's ``model.max_length``, the least ``pack_length`` allowed."""
        self.image_limits.check(f"{where}.image_limits")
        self.video.check(f"{where}.video")
        if self.pack_length is not None and self.pack_length <= 0:
            raise RecipeError(f"{where}.pack_length: expected a positive integer (or null for model.max_length), "
                              f"got {self.pack_length!r}")
        if self.pack_length is not None and max_length is not None and self.pack_length < max_length:
            raise RecipeError(f"{where}.pack_length: {self.pack_length} is less than model.max_length {max_length}; "
                              "a sample may have up to model.max_length tokens and is never split across rows "
                              "(lower model.max_length or raise pack_length)")
        row = (self.pack_length or max_length) if self.packing else max_length
        if self.batch_by_tokens is not None and (self.batch_by_tokens <= 0 or (row and self.batch_by_tokens < row)):
            raise RecipeError(f"{where}.batch_by_tokens: expected a positive number of tokens of at least one row "
                              f"({'pack_length' if self.packing and self.pack_length else 'model.max_length'} = {row}), got "
                              f"{self.batch_by_tokens!r} (or null: per_device_batch_size samples per micro-batch)")
        if self.num_workers is not None and self.num_workers < 0:
            raise RecipeError(f"{where}.num_workers: expected a non-negative integer (or null for the default), "
                              f"got {self.num_workers!r}")
        if self.prefetch_factor < 1:
            raise RecipeError(f"{where}.prefetch_factor: expected a positive integer, got {self.prefetch_factor!r}")


PARTS = ("vision", "connector", "llm")
Mode = Literal["frozen", "full", "lora", "qlora"]  # qlora: LoRA over a 4-bit (bitsandbytes NF4) base


@dataclass
class PartModes:
    """What a stage trains, per part. A part left out of the recipe's mapping is frozen."""

    vision: Mode = "frozen"
    connector: Mode = "frozen"
    llm: Mode = "frozen"

    def __getitem__(self, part: str) -> str:
        return getattr(self, part)


@dataclass
class PartLRs:
    """Learning rate per part; required for every part that is not frozen."""

    vision: Optional[float] = None
    connector: Optional[float] = None
    llm: Optional[float] = None

    def __getitem__(self, part: str) -> Optional[float]:
        return getattr(self, part)

    def as_dict(self) -> dict:
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}


@dataclass
class StageConfig:
    """One training stage: which parts train (``trainable``), at which learning rates (``lr``), for how long."""

    name: str = "stage"
    template: Optional[str] = None  # None = the model's template
    data: Optional[DataConfig] = None  # None = the recipe's top-level data
    trainable: PartModes = field(default_factory=lambda: PartModes(connector="full"))
    lr: PartLRs = field(default_factory=lambda: PartLRs(connector=1e-3))
    epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides epochs
    global_batch_size: int = 8
    per_device_batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    # sft: token-mean cross-entropy; dpo: preference pairs (mmkit.train.dpo), the keys below
    objective: Literal["sft", "dpo"] = "sft"
    beta: float = 0.1  # dpo: strength of the pull towards the reference (IPO: its tau)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # dpo: DPO's -log sigmoid, or IPO's squared loss
    label_smoothing: float = 0.0  # dpo, sigmoid: the assumed share of flipped preferences (conservative DPO)
    sft_weight: float = 0.0  # dpo: weight of an added token-mean cross-entropy on the chosen answers
    # dpo: the reference model = the stage's starting weights: "adapter" (LoRA stages: the model with its
    # adapters disabled), "copy" (a frozen copy, saved with the run for resumes), "precomputed" (every pair scored
    # once when the stage starts, RUN/dpo_reference/stageN.safetensors, looked up by the pair's index while
    # training: no second model, works under fsdp), "auto" (adapter with LoRA, else copy; precomputed under fsdp)
    reference: Literal["auto", "adapter", "copy", "precomputed"] = "auto"

    def check(self, where: str) -> None:
        """Cross-field rules; each error names its key path under ``where`` (e.g. ``stages[1]``)."""
        if self.objective == "dpo":
            if not self.beta > 0:
                raise RecipeError(f"{where}.beta: expected a positive number, got {self.beta!r}")
            if not 0 <= self.label_smoothing < 0.5:
                raise RecipeError(f"{where}.label_smoothing: expected a number in [0, 0.5), got "
                                  f"{self.label_smoothing!r}")
            if self.label_smoothing and self.loss_type != "sigmoid":
                raise RecipeError(f"{where}.label_smoothing: only for loss_type sigmoid, not {self.loss_type!r}")
            if not self.sft_weight >= 0:
                raise RecipeError(f"{where}.sft_weight: expected a number >= 0, got {self.sft_weight!r}")
            if self.reference == "adapter" and self.trainable.llm not in ("lora", "qlora"):
                raise RecipeError(f"{where}.reference: 'adapter' needs trainable.llm lora or qlora, got "
                                  f"{self.trainable.llm!r} (use 'copy')")
            if self.trainable.llm == "qlora" and self.reference == "copy":
                raise RecipeError(f"{where}.reference: 'copy' of a 4-bit model is not supported (use 'adapter')")
        for part in PARTS:
            mode = self.trainable[part]
            if mode in ("lora", "qlora") and part != "llm":
                raise RecipeError(f"{where}.trainable.{part}: {mode} is supported for the llm only")
            if mode != "frozen" and self.lr[part] is None:
                raise RecipeError(f"{where}.lr.{part}: missing learning rate for a trainable part")
            if self.lr[part] is not None and self.lr[part] <= 0:
                raise RecipeError(f"{where}.lr.{part}: expected a positive number, got {self.lr[part]!r}")
        for key in ("global_batch_size", "per_device_batch_size", "lora_r"):
            if getattr(self, key) <= 0:
                raise RecipeError(f"{where}.{key}: expected a positive integer, got {getattr(self, key)!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise RecipeError(f"{where}.max_steps: expected a positive integer (or null for epochs), "
                              f"got {self.max_steps!r}")
        if self.epochs <= 0:
            raise RecipeError(f"{where}.epochs: expected a positive number, got {self.epochs!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError(f"{where}.warmup_ratio: expected a number in [0, 1), got {self.warmup_ratio!r}")
        if self.global_batch_size % self.per_device_batch_size:
            raise RecipeError(f"{where}: global_batch_size {self.global_batch_size} is not a multiple of "
                              f"per_device_batch_size {self.per_device_batch_size}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    bf16: bool = False  # bf16 autocast
    gradient_checkpointing: bool = False
    save_every: int = 0  # steps; 0 = only at the end of each stage
    keep_last: int = 2
    log_every: int = 10
    eval_every: int = 0


@dataclass
class EvalConfig:
    questions: Optional[str] = None
    image_folder: Optional[str] = None
    task: Optional[str] = None  # scorer (python -m mmkit.eval.score --task), a name in mmkit.registry.scorers
    annotations: Optional[str] = None  # answer key for the scorer
    limit: Optional[int] = None  # evaluate at most this many questions per run of the hook
    max_new_tokens: int = 16


@dataclass
class Recipe:
    name: str = "mmkit"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # active plug-ins (mmkit.registry.plugins): name -> an instance of that plug-in's `options` dataclass;
    # the mapping's value types depend on its keys, so _build hands it to _build_plugins (defined below)
    plugins: dict = field(default_factory=dict, metadata={"convert": lambda value, where: _build_plugins(value, where)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# --------------------------------------------------------------------------- typed conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string",
            dict: "a mapping", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check and convert ``value`` to the annotated type ``tp``; errors name ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = closest(str(value), [str(c) for c in choices])
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise RecipeError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    return value


# Keys that older recipes (and run directories saved by older mmkit versions) hold but that mean nothing now:
# ignored with a warning, so they keep loading.
RETIRED = {"Recipe": {"demo": "the demo's options are plugins.shapes_demo now"}}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key in RETIRED.get(cls.__name__, {}):
            if value not in (None, 0):
                log.warning("%s=%r is ignored (%s)", path, value, RETIRED[cls.__name__][key])
            continue
        if key not in fields:
            hint = closest(str(key), fields)
            extra = f"; did you mean {hint!r}?" if hint else f"; known keys: {', '.join(sorted(fields))}"
            raise RecipeError(f"{path}: unknown key{extra}")
        convert = fields[key].metadata.get("convert")  # a field whose type the annotation cannot say
        kwargs[key] = convert(value, path) if convert else _convert(value, hints[key], path)
    return cls(**kwargs)


def _build_plugins(value: Any, where: str) -> dict:
    """``plugins:``: each key a registered plug-in, each value checked against its ``options`` dataclass."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping of plug-in name to options, got {value!r}")
    out = {}
    for key, options in value.items():
        path = f"{where}.{key}"
        try:
            name = plugin_registry.canonical(str(key))
        except UnknownNameError as exc:
            raise RecipeError(f"{path}: {exc}") from None
        cls = getattr(plugin_registry.get(name), "options", None)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise RecipeError(f"{path}: plug-in {name!r} has no options dataclass (its `options` is {cls!r})")
        out[name] = options if isinstance(options, cls) else _build(cls, options, path)
    return out


# --------------------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: base: cycle ({' -> '.join(str(p) for p in (*seen, path))})")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str) or not b:
            raise RecipeError(f"{path}: base: expected a recipe file name (or a list of them), got {b!r}")
        merged = _deep_merge(merged, _read_yaml(path.parent / b, (*seen, path)))
    return _deep_merge(merged, data)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b[1].c=value`` override in place (value parsed as YAML)."""
    if "=" not in override:
        raise RecipeError(f"override {override!r}: expected key.path=value")
    key, _, raw = override.partition("=")
    value = _parse_scalar(raw)
    parts: list[Any] = []
    for piece in key.strip().split("."):
        while "[" in piece:  # stages[1] -> "stages", 1
            name, _, rest = piece.partition("[")
            index, _, piece = rest.partition("]")
            if name:
                parts.append(name)
            try:
                parts.append(int(index))
            except ValueError:
                raise RecipeError(f"override {override!r}: bad index [{index}]") from None
        if piece:
            parts.append(piece)
    if not parts:
        raise RecipeError(f"override {override!r}: expected key.path=value (the key is empty)")
    node: Any = data
    for i, part in enumerate(parts):
        where = _key_path(parts[:i])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"override {override!r}: index {part} is out of range"
                                  + (f" ({where} has {len(node)} entries)" if isinstance(node, list) else ""))
        elif not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: {where} is {node!r}, not a mapping")
        if i == len(parts) - 1:
            node[part] = value
        elif isinstance(part, int):
            node = node[part]
        else:
            if node.get(part) is None:
                node[part] = [] if isinstance(parts[i + 1], int) else {}
            node = node[part]


def _key_path(parts: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(parts))


def recipe_changes(old: Recipe, new: Recipe, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key.path: old -> new`` for every value that differs between two recipes (``ignore``: key paths)."""
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if where in ignore:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        elif a != b:
            out.append(f"{where}: {a!r} -> {b!r}")

    walk(old.to_dict(), new.to_dict(), "")
    return out


def split_known_fields(default: Any, given: dict) -> tuple[dict, list[str]]:
    """(the fields of ``given`` that ``default`` has, the names of the others): for configs read from checkpoints,
    which carry fields of older library versions (e.g. ``max_length`` in LLaVA-1.5's config.json)."""
    kept = {k: v for k, v in given.items() if hasattr(default, k)}
    return kept, sorted(k for k in given if k not in kept)


def check_known_fields(default: Any, given: dict, where: str, what: str) -> None:
    """Every key of ``given`` (e.g. ``model.llm.config``) must be an attribute of ``default`` (the library's
    default config object): transformers keeps unknown keys silently, so a typo would build the default size."""
    for key in given:
        if not hasattr(default, key):
            hint = closest(str(key), [k for k in vars(default) if not k.startswith("_")])
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise RecipeError(f"{where}.{key}: not a field of {what}{extra}")


SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "image_size", "patch_size", "vocab_size", "max_position_embeddings")


def check_sizes(given: dict, where: str) -> None:
    """Sizes and counts of a random-init config must be positive integers (transformers accepts -1)."""
    for key in SIZE_FIELDS:
        value = given.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise RecipeError(f"{where}.{key}: expected a positive integer, got {value!r}")


def check_recipe(recipe: Recipe) -> None:
    """Rules that span fields and value ranges (the types were checked while building)."""
    check_sizes(recipe.model.vision.config, "model.vision.config")
    check_sizes(recipe.model.llm.config, "model.llm.config")
    max_length = recipe.model.max_length
    recipe.data.check("data", max_length)
    for i, stage in enumerate(recipe.stages):
        stage.check(f"stages[{i}]")
        if stage.data is not None:
            stage.data.check(f"stages[{i}].data", max_length)


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    try:
        recipe = _build(Recipe, data, "")
        check_recipe(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return recipe


def load_recipe(path_or_data: str | Path | dict | Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe from a YAML path, a dict or a Recipe, then apply overrides in order: ``key.path=value``
    (value parsed as YAML) or the path of an overlay YAML that is deep-merged over the recipe."""
    if isinstance(path_or_data, Recipe):
        if not overrides:
            return copy.deepcopy(path_or_data)
        data, source = path_or_data.to_dict(), "recipe"
    elif isinstance(path_or_data, dict):
        data, source = copy.deepcopy(path_or_data), "recipe"
        data.pop("base", None)
    else:
        data, source = _read_yaml(Path(path_or_data)), str(path_or_data)
    for override in overrides:
        if "=" not in override and override.endswith((".yaml", ".yml")):  # an overlay recipe, deep-merged
            data = _deep_merge(data, _read_yaml(Path(override)))
            continue
        try:
            apply_override(data, override)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
    return recipe_from_dict(data, source)
