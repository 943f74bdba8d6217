"""The typical tutorial BentoML image service, as the peer for bench.serve_load: BentoML decodes the upload into a
PIL image, torchvision transforms it, torch eager fp32 NCHW runs it. Same artifact, same model, same answer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import PIL.Image
import torch
from torchvision import transforms

ARTIFACT = Path(os.environ["PLAIN_ARTIFACT"])


@bentoml.service(traffic={"timeout": 120, "max_concurrency": 128}, http={"port": 3000})
class PlainClassifier:
    def __init__(self) -> None:
        import timm
        from safetensors.torch import load_file

        cfg = json.loads((ARTIFACT / "config.json").read_text())
        self.labels = cfg["label_names"]
        self.model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"])
        self.model.load_state_dict(load_file(str(ARTIFACT / "model.safetensors")))
        self.model.eval()
        p = cfg["pretrained_cfg"]
        size = p["input_size"][-1]
        self.tf = transforms.Compose([
            transforms.Resize(int(size / p["crop_pct"]), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(p["mean"], p["std"])])

    @bentoml.api
    def classify(self, image: PIL.Image.Image, top_k: int = 5) -> dict:
        x = self.tf(image.convert("RGB"))[None]
        with torch.no_grad():
            probs = torch.softmax(self.model(x), -1)[0]
        top = probs.topk(min(top_k, len(self.labels)))
        return {"predictions": [{"label": self.labels[i], "score": float(s)} for s, i in zip(top.values, top.indices)]}
