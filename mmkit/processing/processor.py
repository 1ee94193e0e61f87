"""MultimodalProcessor: images + text -> model inputs, with every ``<image>`` already expanded.

    inputs = model.processor(images=[img], text=["<image>\\nWhat is this?"], template="vicuna_v1")
    out = model(**inputs)

Each ``<image>`` placeholder becomes exactly as many image-token ids as that image produces
(AnyRes counts depend on its size), so sequence lengths are known before the forward pass.
Images are consumed in order of appearance across the batch's texts. The image parameters are the
image processor's ``spec`` (for a model: ``model.image_spec``, see ``mmkit.processing.spec``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mmkit.processing.image import ImageProcessor
from mmkit.processing.spec import AnyResSpec
from mmkit.processing.text import build_inference_ids, tokenize_conversation

IGNORE_INDEX = -100


class MultimodalProcessor:
    def __init__(self, tokenizer, image_processor: ImageProcessor, template: str, image_token: str,
                 image_token_id: int, tokens_per_view: int, patches_per_side: int, *,
                 max_length: int | None = None, system_prompt: str | None = None, video_token: str = "<video>",
                 video_token_id: int | None = None):
        # merge, newline and the AnyRes settings are image_processor.spec's; max_length and system_prompt are
        # keyword-only so that a call written for the old (..., patches_per_side, merge, max_length) order fails loudly
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.image_processor = image_processor
        self.template = template
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.tokens_per_view = tokens_per_view
        self.patches_per_side = patches_per_side
        self.max_length = max_length
        self.video_token = video_token  # the recipe's model.video_token: the placeholder of a video in prompts
        self.video_token_id = video_token_id  # the model's video_token_id (None: the model takes no video)

    @classmethod
    def for_model(cls, model) -> "MultimodalProcessor":
        """The processor of ``model``: its ``image_spec``, its encoder's resize mode and token counts."""
        m = model.recipe.model
        encoder = model.vision.spec
        img = ImageProcessor(model.image_spec, resize_mode=encoder.resize_mode)
        return cls(model.tokenizer, img, model.template, m.image_token, model.image_token_id,
                   model.vision.num_tokens, encoder.patches_per_side, max_length=m.max_length,
                   system_prompt=m.system_prompt, video_token=m.video_token,
                   video_token_id=getattr(model, "video_token_id", None))

    @property
    def spec(self) -> AnyResSpec:
        return self.image_processor.spec

    # ------------------------------------------------------------------ images

    def num_image_tokens(self, image_hw: Sequence[int], multi_image: bool = False) -> int:
        if self.spec.merge == "flat":  # every view's encoder tokens, CLS included where the encoder keeps it
            return self.image_processor.num_views(image_hw, multi_image) * self.tokens_per_view
        return self.image_processor.num_image_tokens(image_hw, self.patches_per_side, multi_image=multi_image)

    def is_multi_image(self, n_images: int) -> bool:
        """OneVision: a sample with several images gets one base view per image (no tiles)."""
        spec = self.spec
        return n_images > 1 and spec.aspect_ratio == "anyres" and spec.anyres_max is not None

    def process_images(self, images: Sequence, multi_image: bool | None = None) -> dict:
        """One sample's PIL images -> pixel_values (one [views, 3, S, S] per image), image_sizes (h, w), token counts."""
        images = list(images)
        multi = self.is_multi_image(len(images)) if multi_image is None else multi_image
        out = self.image_processor(images, multi_image=multi) if images else {"pixel_values": [], "image_sizes": []}
        out["num_tokens"] = [self.num_image_tokens(hw, multi) for hw in out["image_sizes"]]
        return out

    def process_videos(self, videos: Sequence) -> dict:
        """Videos (each a list of PIL frames) -> pixel_values_videos (one [frames, 3, S, S] per video), token counts."""
        frames = [self.image_processor.preprocess_video(list(v)) for v in videos]
        counts = [self.image_processor.num_video_tokens(f.shape[0], self.patches_per_side) for f in frames]
        return {"pixel_values_videos": frames, "num_tokens": counts}

    # ------------------------------------------------------------------ text

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass input_ids directly or set model.llm.tokenizer")
        return self.tokenizer

    def expand(self, text: str, counts: Sequence[int]) -> str:
        """Replace the k-th ``<image>`` by ``counts[k]`` copies of the image token."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"the text has {len(pieces) - 1} {self.image_token} placeholders but "
                             f"{len(counts)} images were given")
        out = pieces[0]
        for count, piece in zip(counts, pieces[1:]):
            out += self.image_token * count + piece
        return out

    def with_system(self, turns: list[dict]) -> list[dict]:
        """Prepend the recipe's system prompt unless the chat brings its own."""
        if self.system_prompt is None or not turns:
            return list(turns)
        first = turns[0]
        if first.get("role", first.get("from")) == "system":
            return list(turns)
        key = ("role", "content") if "role" in first else ("from", "value")
        return [{key[0]: "system", key[1]: self.system_prompt}, *turns]

    def encode_messages(self, messages: list[dict], images: Sequence = (), template: str | None = None) -> dict:
        """One chat (``[{"role", "content"}]``) -> ids ending in the open assistant slot."""
        messages = self.with_system(messages)
        tok = self._require_tokenizer()
        pix = self.process_images(images)
        ids = build_inference_ids(tok, template or self.template, messages, image_token_counts=pix["num_tokens"],
                                  image_token=self.image_token, image_token_id=self.image_token_id)
        return {"input_ids": list(ids), "pixel_values": pix["pixel_values"], "image_sizes": pix["image_sizes"]}

    def encode_ids_with_counts(self, messages: list[dict], counts: Sequence[int], template: str | None = None) -> list:
        """A chat's ids ending in the open assistant slot, the k-th ``<image>`` expanded to ``counts[k]`` image
        tokens (for placeholders whose features the caller computes, e.g. videos)."""
        tok = self._require_tokenizer()
        return list(build_inference_ids(tok, template or self.template, messages, image_token_counts=list(counts),
                                        image_token=self.image_token, image_token_id=self.image_token_id))

    def encode_conversation(self, conversations: list[dict], images: Sequence = (), template: str | None = None,
                            max_length: int | None = None) -> dict:
        """A LLaVA training record -> ids and labels built turn by turn (see ``mmkit.processing.text``)."""
        conversations = self.with_system(conversations)
        tok = self._require_tokenizer()
        pix = self.process_images(images)
        enc = tokenize_conversation(tok, template or self.template, conversations, image_token=self.image_token,
                                    image_token_id=self.image_token_id, image_token_counts=pix["num_tokens"],
                                    max_length=max_length or self.max_length)
        kept = enc.get("num_images", len(pix["pixel_values"]))  # truncation may drop trailing turns' images
        return {"input_ids": list(enc["input_ids"]), "labels": list(enc["labels"]),
                "pixel_values": pix["pixel_values"][:kept], "image_sizes": pix["image_sizes"][:kept]}

    def __call__(self, images: Sequence | None = None, text: str | Sequence[str] = "", template: str | None = None,
                 padding_side: str = "left", videos: Sequence | None = None, video_token: str | None = None) -> dict:
        """Batch of prompts -> padded inputs.

        ``template=None``: each text is used verbatim (``<image>`` expanded, tokenized whole, like
        transformers' processors). With a template name, each text is one user turn rendered with
        the template's generation prompt.
        """
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        if videos:
            return self._with_videos(images, texts, list(videos), video_token or self.video_token, padding_side)
        per_text = [t.count(self.image_token) for t in texts]
        if sum(per_text) != len(images):
            raise ValueError(f"the texts have {sum(per_text)} {self.image_token} placeholders in all, "
                             f"but {len(images)} images were given")
        samples, start = [], 0
        for t, n in zip(texts, per_text):
            imgs = images[start:start + n]
            start += n
            if template is None:
                tok = self._require_tokenizer()
                pix = self.process_images(imgs)
                ids = tok(self.expand(t, pix["num_tokens"]))["input_ids"]
                samples.append({"input_ids": list(ids), "pixel_values": pix["pixel_values"],
                                "image_sizes": pix["image_sizes"]})
            else:
                samples.append(self.encode_messages([{"role": "user", "content": t}], imgs, template))
        return self.pad(samples, padding_side=padding_side)

    def _with_videos(self, images, texts, videos, video_token, padding_side) -> dict:
        """Verbatim prompts with ``<image>`` and ``<video>`` placeholders (OneVision video input)."""
        tok = self._require_tokenizer()
        samples, i_start, v_start = [], 0, 0
        for t in texts:
            n_img, n_vid = t.count(self.image_token), t.count(video_token)
            pix = self.process_images(images[i_start:i_start + n_img])
            vid = self.process_videos(videos[v_start:v_start + n_vid])
            i_start, v_start = i_start + n_img, v_start + n_vid
            pieces = t.split(video_token)
            if len(pieces) - 1 != len(vid["num_tokens"]):
                raise ValueError(f"the text has {len(pieces) - 1} {video_token} placeholders but "
                                 f"{len(vid['num_tokens'])} videos were given")
            expanded = pieces[0] + "".join(video_token * n + p for n, p in zip(vid["num_tokens"], pieces[1:]))
            ids = tok(self.expand(expanded, pix["num_tokens"]))["input_ids"]
            samples.append({"input_ids": list(ids), "pixel_values": pix["pixel_values"],
                            "image_sizes": pix["image_sizes"], "pixel_values_videos": vid["pixel_values_videos"]})
        if i_start != len(images) or v_start != len(videos):
            raise ValueError(f"{len(images)} images and {len(videos)} videos given, but the texts have "
                             f"{i_start} {self.image_token} and {v_start} {video_token} placeholders")
        batch = self.pad(samples, padding_side=padding_side)
        batch["pixel_values_videos"] = [v for s in samples for v in s["pixel_values_videos"]]
        return batch

    def encode_video_conversation(self, conversations: list[dict], video: Sequence, template: str | None = None,
                                  max_length: int | None = None) -> dict:
        """A training record with one video (its sampled frames) and one ``video_token`` placeholder -> ids and
        labels, the placeholder expanded to the video's rows (``pixel_values_videos``: one ``[frames, 3, S, S]``)."""
        if self.video_token_id is None:
            raise ValueError("this model takes no video (model.video_token_id is not set in the recipe)")
        conversations = self.with_system(conversations)
        tok = self._require_tokenizer()
        vid = self.process_videos([video])
        enc = tokenize_conversation(tok, template or self.template, conversations, image_token=self.video_token,
                                    image_token_id=self.video_token_id, image_token_counts=vid["num_tokens"],
                                    max_length=max_length or self.max_length)
        if enc.get("num_images", 1) < 1:  # truncation cut the video's turn: nothing of the video is left
            raise ValueError("too long for max_length: the video's tokens do not fit")
        return {"input_ids": list(enc["input_ids"]), "labels": list(enc["labels"]), "pixel_values": [],
                "image_sizes": [], "pixel_values_videos": vid["pixel_values_videos"]}

    def pad(self, samples: list[dict], padding_side: str = "right") -> dict:
        """Pad ids (pad id), labels (-100) and build the attention mask; gather images in order."""
        pad_id = self.pad_token_id
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        has_labels = all("labels" in s for s in samples)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[i, sl] = torch.tensor(s["input_ids"], dtype=torch.long)
            mask[i, sl] = 1
            if labels is not None:
                labels[i, sl] = torch.tensor(s["labels"], dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = labels
        pixel_values = [p for s in samples for p in s.get("pixel_values", [])]
        if pixel_values:
            batch["pixel_values"] = pixel_values
            batch["image_sizes"] = [tuple(hw) for s in samples for hw in s.get("image_sizes", [])]
        videos = [v for s in samples for v in s.get("pixel_values_videos", [])]
        if videos:
            batch["pixel_values_videos"] = videos
        return batch

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if tok is not None and tok.pad_token_id is not None:
            return tok.pad_token_id
        return 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._require_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)
