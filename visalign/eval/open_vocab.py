"""GenEval-style detection for real models: OWLv2 boxes (transformers) + a CLIP colour classifier (open_clip).

"GenEval-style", not GenEval: the original uses an mmdet Mask2Former, which does not install cleanly;
the thresholds (0.3, 0.9 for counting), the 16-per-class cap, the colour names and the rules are GenEval's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..registry import DETECTORS
from .rules import DetectedObject

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {o}.", "a photo of a {c}-colored {o}.", "a photo of a {c} object.")


@DETECTORS.register("owlv2")
class OpenVocabDetector:
    """Objects of the record's classes in a generated image, most confident first, with a colour each."""

    def __init__(self, detector: str = "google/owlv2-base-patch16-ensemble", clip_arch: str = "ViT-L-14",
                 clip_pretrained: str = "openai", threshold: float = 0.3, counting_threshold: float = 0.9,
                 max_per_class: int = 16):
        from transformers import AutoTokenizer, Owlv2ForObjectDetection, Owlv2ImageProcessor

        from ..models.load import load_transformers

        self.model = load_transformers(Owlv2ForObjectDetection, detector, what="OWLv2 detector",
                                       key="--detector").eval()
        self.image_processor = load_transformers(Owlv2ImageProcessor, detector, what="OWLv2 image processor",
                                                 key="--detector")
        self.tokenizer = load_transformers(AutoTokenizer, detector, what="OWLv2 tokenizer", key="--detector")
        self.clip_spec, self._clip = (clip_arch, clip_pretrained), None  # loaded at the first colour asked
        self.threshold, self.counting_threshold, self.max_per_class = threshold, counting_threshold, max_per_class

    @property
    def clip(self):
        if self._clip is None:
            from ..rewards.clip_models import _open_clip

            self._clip = _open_clip(*self.clip_spec, "geneval colour classifier")
        return self._clip[0]

    @property
    def clip_tokenizer(self):
        self.clip  # noqa: B018  (loads the model and its tokenizer together)
        return self._clip[1]

    @torch.no_grad()
    def _detect(self, image: torch.Tensor, classes: list[str], threshold: float) -> dict:
        from ..images import to_pil

        pixels = self.image_processor(images=to_pil(image), return_tensors="pt")["pixel_values"]
        text = self.tokenizer([f"a photo of a {c}" for c in classes], padding="max_length", truncation=True,
                              max_length=16, return_tensors="pt")
        out = self.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
        side = max(image.shape[-2:])  # OWLv2 pads to a square: boxes are relative to it
        return self.image_processor.post_process_object_detection(out, threshold=threshold,
                                                                   target_sizes=[(side, side)])[0]

    def class_scores(self, image: torch.Tensor, cls: str) -> list[float]:
        """Every box's score for one class, best first, at most ``max_per_class`` (calibrate-detector's input)."""
        res = self._detect(image, [cls], 0.0)
        return sorted(res["scores"].tolist(), reverse=True)[: self.max_per_class]

    @torch.no_grad()
    def check_records(self, records: Sequence[dict], source: str | None = None) -> None:
        """Any class names are open vocabulary: nothing to refuse up front."""

    def objects(self, image: torch.Tensor, record: dict) -> list[DetectedObject]:
        """GenEval's detector call for one record: its classes, the counting threshold for counting prompts."""
        return self.detect(image, record_classes(record), counting=record["tag"] == "counting")

    def detect(self, image: torch.Tensor, classes: Sequence[str], counting: bool = False) -> list[DetectedObject]:
        """Detections (class in ``shape``) above GenEval's threshold, sorted by confidence, with CLIP colours."""
        classes = list(dict.fromkeys(classes))
        h, w = image.shape[-2:]
        side = max(h, w)
        res = self._detect(image, classes, self.counting_threshold if counting else self.threshold)
        found: list[tuple[float, DetectedObject]] = []
        for c_idx, cls in enumerate(classes):
            sel = (res["labels"] == c_idx).nonzero().flatten()
            sel = sel[res["scores"][sel].argsort(descending=True)][: self.max_per_class]
            for i in sel.tolist():
                x0, y0, x1, y1 = (int(round(float(v))) for v in res["boxes"][i].clamp(0, side))
                x0, y0 = min(x0, w - 1), min(y0, h - 1)
                box = (x0, y0, max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1))
                found.append((float(res["scores"][i]), DetectedObject(cls, self.colour(image, box, cls), box)))
        found.sort(key=lambda x: -x[0])
        return [o for _, o in found]

    @torch.no_grad()
    def colour(self, image: torch.Tensor, box: tuple[int, int, int, int], cls: str) -> str:
        """Zero-shot CLIP colour of the box crop over GenEval's 10 colours, 3 templates averaged."""
        from ..rewards.clip_models import _size, clip_pixels

        x0, y0, x1, y1 = box
        crop = image[:, y0:y1, x0:x1].unsqueeze(0)
        emb = F.normalize(self.clip.encode_image(clip_pixels(crop, _size(self.clip))).float(), dim=-1)
        prompts = [t.format(c=c, o=cls) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
        txt = F.normalize(self.clip.encode_text(self.clip_tokenizer(prompts)).float(), dim=-1)
        txt = F.normalize(txt.view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(1), dim=-1)
        return GENEVAL_COLORS[int((emb @ txt.T).argmax())]


def record_classes(record: dict) -> list[str]:
    return [c["class"] for c in record.get("include", []) + record.get("exclude", [])]
