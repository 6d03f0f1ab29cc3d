"""A tiny random Wan2.1-T2V folder in the Diffusers layout, for the prompt -> video tests.

Built from the real library classes (transformers UMT5EncoderModel + a T5 tokenizer with a tiny
trained unigram vocabulary, diffusers AutoencoderKLWan and WanTransformer3DModel) with tiny sizes,
so the loading code paths are exactly the ones a real Wan2.1-T2V-1.3B-Diffusers folder takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Sizes: latent channels 16 (as Wan), text dim 32, head_dim 64 (a size the attention kernel has).
Z_DIM = 16
TEXT_DIM = 32
SENTENCES = [
    "a cat walks on the beach at sunset",
    "a red car drives through the city at night",
    "waves crash on the rocks under a grey sky",
    "an astronaut rides a horse in space",
]


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def build_tiny_wan_folder(root: Path, seed: int = 0) -> Path:
    """Write text_encoder/, tokenizer/, vae/, transformer/, scheduler/ and model_index.json."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = _tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")

    enc_cfg = UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=1,
                         num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    UMT5EncoderModel(enc_cfg).eval().save_pretrained(root / "text_encoder")

    gen = torch.Generator().manual_seed(seed + 1)
    mean = (torch.rand(Z_DIM, generator=gen) - 0.5).tolist()
    std = (0.5 + torch.rand(Z_DIM, generator=gen)).tolist()
    vae = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=mean, latents_std=std)
    vae.eval().save_pretrained(root / "vae")

    transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=64, in_channels=Z_DIM,
                                        out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=128,
                                        num_layers=2)
    transformer.eval().save_pretrained(root / "transformer")

    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "num_train_timesteps": 1000}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }, indent=2))
    return root
