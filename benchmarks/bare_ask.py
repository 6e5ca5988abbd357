"""Baseline for bench_startup: a bare transformers script answering one question.

This is what a user would write without reasonedit: load processor and model, apply the
chat template, generate greedily. reasonedit's `ask --no-edit` is measured against it.
"""

import sys

from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_dir, image_path, question = sys.argv[1], sys.argv[2], sys.argv[3]
processor = AutoProcessor.from_pretrained(model_dir)
model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open(image_path).convert("RGB")], text=[text], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0])
