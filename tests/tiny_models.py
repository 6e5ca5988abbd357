"""Tiny random-weight image-text-to-text models, one builder per supported family.

Each builder writes a complete model directory (config, safetensors, processor with its
chat template, tokenizer) built only from transformers configs and a byte-level BPE
tokenizer trained on a few sentences, so the tests run the real model classes and
processors of every family offline in about a second each. Image processors are the
`*ImageProcessorPil` ones (no torchvision).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

CORPUS = [
    "what shape is in the image? what color is the shape? is there a red shape?",
    "The shape has three corners. A shape with three corners is a triangle.",
    "The answer to 'what is the shape?' is circle. yes no Does the image show a blue square?",
    "Describe this image. The sign is red. Grass is green. The sky is blue.",
    "User: Assistant: system user assistant You are a helpful assistant. Question: Answer:",
]

# Generic chat templates in the style of each family (the real ones are long; these keep
# the same image placeholders and roles).
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type']=='image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for c in m['content'] %}{% if c['type']=='image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role']=='user' %}USER: {% for c in m['content'] %}"
    "{% if c['type']=='image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tokenizer(
    specials: list[str],
    *,
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    extra: dict[str, str] | None = None,
    corpus: list[str] | None = None,
):
    """A byte-level BPE tokenizer whose first ids are `pad, bos, eos, *specials`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = [pad] + ([bos] if bos else []) + [eos]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=base + specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((corpus or CORPUS) * 5, trainer)
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=extra or {},
        **kwargs,
    )


def _llama(tok, hidden: int = 32, layers: int = 2, intermediate: int | None = None, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def _save(model, processor, tok, path: Path) -> Path:
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _save_parts(model, tok, path: Path, processor_cls, image_processor, template, **kwargs):
    """Save a model whose processor has a video processor (it needs torchvision).

    Without torchvision there is no video processor, and a processor without one cannot
    be saved as a whole: write its parts (what a hub checkpoint holds) one by one.
    """
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    image_processor.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(template)
    config = {"processor_class": processor_cls.__name__, **kwargs}
    (path / "processor_config.json").write_text(json.dumps(config) + "\n")
    return path


# ------------------------------------------------------------------------------- LLaVA
def build_tiny_llava(
    path: Path, seed: int = 0, *, text_hidden: int = 32, text_layers: int = 2
) -> Path:
    """LLaVA 1.5 layout: CLIP vision tower, MLP projector, Llama decoder.

    text_hidden / text_layers: a wider, shallower decoder (issue 22: text_hidden=4096,
    one layer gives a 7-8B model's key width at its language layers, 4,096 + 384)."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    # the first four corpus lines only: the tests' expectations were set on this model
    tok = _tokenizer(["<image>"], extra={"image_token": "<image>"}, corpus=CORPUS[:4])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama(
            tok,
            text_hidden,
            text_layers,
            intermediate=None if text_hidden <= 64 else 64,  # keeps a 4,096-wide one small
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return _save(LlavaForConditionalGeneration(config), processor, tok, path)


# ---------------------------------------------------------------------------- Qwen2-VL
def _qwen(path: Path, version: str, seed: int) -> Path:
    import torch
    from transformers import Qwen2VLImageProcessorPil

    specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = _tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ip = Qwen2VLImageProcessorPil(
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32},
    )
    ids = {
        name: tok.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("image_pad", "video_pad", "vision_start", "vision_end")
    }
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=2,
        num_heads=2,
        in_channels=3,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        hidden_size=32,
        out_hidden_size=64,
    )
    common = dict(
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    if version == "3":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model
        from transformers import Qwen3VLProcessor as Processor

        text.update(
            head_dim=32,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        )
        vision.update(
            intermediate_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0]
        )
    elif version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        vision.pop("out_hidden_size")
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        vision.update(intermediate_size=64, window_size=32, fullatt_block_indexes=[1])
    config = Config(text_config=text, vision_config=vision, **common)
    torch.manual_seed(seed)
    return _save_parts(Model(config), tok, path, Processor, ip, QWEN_TEMPLATE)


def build_tiny_qwen2_vl(path: Path, seed: int = 0) -> Path:
    return _qwen(path, "2", seed)


def build_tiny_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    return _qwen(path, "2.5", seed)


def build_tiny_qwen3_vl(path: Path, seed: int = 0) -> Path:
    """Qwen3-VL (the paper's model): Qwen2-VL's processor layout, a merger with its own
    norm, DeepStack features added into the first language block."""
    return _qwen(path, "3", seed)


# ------------------------------------------------------------------- Idefics3 / SmolVLM
def _idefics3(path: Path, family: str, seed: int) -> Path:
    import torch

    specials = [
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
        "<global-img>",
        "<|begin_of_text|>",
    ]
    tok = _tokenizer(
        specials, bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|finetune_pad|>"
    )
    if family == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3ImageProcessorPil as ImageProcessor
        from transformers import Idefics3Processor as Processor
        from transformers import Idefics3VisionConfig as VisionConfig
    else:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMImageProcessorPil as ImageProcessor
        from transformers import SmolVLMProcessor as Processor
        from transformers import SmolVLMVisionConfig as VisionConfig
    ip = ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 32},
    )
    vision = VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = Config(
        vision_config=vision,
        text_config=_llama(tok),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    if family == "smolvlm":
        return _save_parts(
            Model(config), tok, path, Processor, ip, IDEFICS3_TEMPLATE, image_seq_len=4
        )
    processor = Processor(
        image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    return _save(Model(config), processor, tok, path)


def build_tiny_idefics3(path: Path, seed: int = 0) -> Path:
    return _idefics3(path, "idefics3", seed)


def build_tiny_smolvlm(path: Path, seed: int = 0) -> Path:
    return _idefics3(path, "smolvlm", seed)


# ------------------------------------------------------------- LLaVA-NeXT / OneVision
def _llava_next(path: Path, family: str, seed: int) -> Path:
    import torch
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    tok = _tokenizer(["<image>"], extra={"image_token": "<image>"})
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    if family == "llava_next":
        from transformers import LlavaNextConfig as Config
        from transformers import LlavaNextForConditionalGeneration as Model
        from transformers import LlavaNextImageProcessorPil as ImageProcessor
        from transformers import LlavaNextProcessor as Processor
    else:
        from transformers import LlavaOnevisionConfig as Config
        from transformers import LlavaOnevisionForConditionalGeneration as Model
        from transformers import LlavaOnevisionImageProcessorPil as ImageProcessor
        from transformers import LlavaOnevisionProcessor as Processor
    ip_kw = dict(size={"shortest_edge": 32}, image_grid_pinpoints=pinpoints)
    if family == "llava_next":
        ip_kw["crop_size"] = {"height": 32, "width": 32}
    else:
        ip_kw["size"] = {"height": 32, "width": 32}
    ip = ImageProcessor(**ip_kw)
    # OneVision uses SigLIP (no CLS token): all 16 patch tokens are image tokens.
    vision_cls = CLIPVisionConfig if family == "llava_next" else SiglipVisionConfig
    vision = vision_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = Config(
        vision_config=vision,
        text_config=_llama(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default" if family == "llava_next" else "full",
    )
    proc_kw = dict(
        patch_size=8, vision_feature_select_strategy=config.vision_feature_select_strategy
    )
    if family == "llava_next":
        proc_kw["num_additional_image_tokens"] = 1
    else:
        proc_kw["num_image_tokens"] = 16
    torch.manual_seed(seed)
    if family == "llava_onevision":
        return _save_parts(Model(config), tok, path, Processor, ip, LLAVA_TEMPLATE, **proc_kw)
    processor = Processor(
        image_processor=ip, tokenizer=tok, chat_template=LLAVA_TEMPLATE, **proc_kw
    )
    return _save(Model(config), processor, tok, path)


def build_tiny_llava_next(path: Path, seed: int = 0) -> Path:
    return _llava_next(path, "llava_next", seed)


def build_tiny_llava_onevision(path: Path, seed: int = 0) -> Path:
    return _llava_next(path, "llava_onevision", seed)


# ---------------------------------------------------------------------- InstructBLIP
def build_tiny_instructblip(path: Path, seed: int = 0, *, lm: str = "llama") -> Path:
    """InstructBLIP: a vision tower, the Q-Former (which also reads the instruction) and a
    Llama decoder (`lm="llama"`, as Vicuna) or a Flan-T5 encoder-decoder (`lm="t5"`)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        BertTokenizerFast,
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    if lm == "t5":  # T5's special ids: pad 0 (also the decoder start), eos 1, no BOS
        tok = _tokenizer(["<image>"], bos=None, eos="</s>", pad="<pad>")
    else:
        tok = _tokenizer(["<image>"])  # the processor registers <image> itself
    # A word-level BERT-style tokenizer for the Q-Former's view of the instruction.
    words = sorted({w.strip("?.,'").lower() for line in CORPUS for w in line.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    wt = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    wt.normalizer = normalizers.BertNormalizer(lowercase=True)
    wt.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wt.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    qtok = BertTokenizerFast(
        tokenizer_object=wt,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32})
    num_query = 4
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
            vocab_size=len(vocab),
            max_position_embeddings=128,
            pad_token_id=0,
        ).to_dict(),
        text_config=(_t5(tok) if lm == "t5" else _llama(tok)).to_dict(),
        num_query_tokens=num_query,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    processor = InstructBlipProcessor(
        image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=num_query
    )
    torch.manual_seed(seed)
    return _save(InstructBlipForConditionalGeneration(config), processor, tok, path)


# ---------------------------------------------------------------- Gemma 3 / PaliGemma
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type']=='image' %}<start_of_image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _siglip(**kw):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        **kw,
    )


def build_tiny_gemma3(path: Path, seed: int = 0) -> Path:
    """Gemma 3: SigLIP tower, a projector that pools and norms (no Linear), Gemma 3 LM."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    names = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    specials = [*names.values(), "<start_of_turn>", "<end_of_turn>"]
    tok = _tokenizer(specials, bos="<bos>", eos="<eos>", pad="<pad>", extra=names)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    text = Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=len(tok),
        max_position_embeddings=512,
        sliding_window=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip(vision_use_head=False),
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(
        image_processor=ip, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4
    )
    torch.manual_seed(seed)
    return _save(Gemma3ForConditionalGeneration(config), processor, tok, path)


def build_tiny_paligemma(path: Path, seed: int = 0) -> Path:
    """PaliGemma: SigLIP tower, one-Linear projector, Gemma LM with a bidirectional
    prefix (token_type_ids); no chat template (the processor adds image tokens and BOS)."""
    import torch
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tok = _tokenizer(["<image>"], bos="<bos>", eos="<eos>", pad="<pad>")
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16  # (32 / 8) ** 2 patches
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <loc>/<seg>
    text = GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=_siglip(projection_dim=32),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
    )
    torch.manual_seed(seed)
    return _save(PaliGemmaForConditionalGeneration(config), processor, tok, path)


def _t5(tok):
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",  # Flan-T5's feed-forward
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )


def build_tiny_instructblip_t5(path: Path, seed: int = 0) -> Path:
    return build_tiny_instructblip(path, seed, lm="t5")


#: One builder per family of `reasonedit_cli.families.FAMILIES` (keyed by its config
#: `model_type`), plus variants (`tests/test_families.py` checks that none is missing).
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava": build_tiny_llava,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "gemma3": build_tiny_gemma3,
    "paligemma": build_tiny_paligemma,
    "idefics3": build_tiny_idefics3,
    "smolvlm": build_tiny_smolvlm,
    "llava_next": build_tiny_llava_next,
    "llava_onevision": build_tiny_llava_onevision,
    "instructblip": build_tiny_instructblip,
    "instructblip_t5": build_tiny_instructblip_t5,
}
