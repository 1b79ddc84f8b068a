"""Write a tiny, randomly initialised Stable Diffusion XL pipeline to a local directory.

The architecture is SDXL's (``UNet2DConditionModel`` with ``addition_embed_type='text_time'``, two CLIP text
encoders, the second with a projection, a KL VAE and SDXL's Euler scheduler settings) with small channel counts, so
the training tool, the exports and the tests run on a CPU in seconds. The tokenizers are the real CLIP BPE
tokenizer, rebuilt from the ``bpe_simple_vocab_16e6.txt.gz`` file that ships in the ``open_clip_torch`` wheel (no
download). Nothing here is pretrained: use it to test plumbing, not to judge image quality.

Usage::

    python tools/make_tiny_sdxl.py --output_dir /tmp/tiny-sdxl
    visadapt-train-sdxl --pretrained_model_name_or_path /tmp/tiny-sdxl ...
"""
from __future__ import annotations

import argparse
import gzip
import os
from typing import Dict, List, Tuple

import torch

#: SDXL's noise schedule (the ``scheduler/scheduler_config.json`` of stable-diffusion-xl-base-1.0)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', num_train_timesteps=1000,
                      prediction_type='epsilon', steps_offset=1, timestep_spacing='leading', interpolation_type='linear',
                      use_karras_sigmas=False)


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges() -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """CLIP's BPE vocabulary (49,408 tokens) and merge list, from open_clip's packaged ``bpe_simple_vocab_16e6``."""
    import open_clip
    bpe = os.path.join(os.path.dirname(open_clip.__file__), 'bpe_simple_vocab_16e6.txt.gz')
    lines = gzip.open(bpe).read().decode('utf-8').split('\n')
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # as open_clip.tokenizer.SimpleTokenizer
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + '</w>' for v in vocab] + [''.join(m) for m in merges]
    vocab += ['<|startoftext|>', '<|endoftext|>']
    return {tok: i for i, tok in enumerate(vocab)}, merges


def make_tiny_sdxl(output_dir: str, seed: int = 0, sample_size: int = 32) -> str:
    """Build and ``save_pretrained`` a tiny SDXL pipeline into ``output_dir``; returns the directory.

    Args:
        output_dir: where the pipeline folders (unet, vae, text_encoder, ...) are written.
        seed: RNG seed of the random initialisation.
        sample_size: the UNet's latent size; the VAE halves the image size once, so images are 2× this.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type='text_time',
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
                        norm_num_groups=16, sample_size=2 * sample_size)
    text_config = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                       intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3,
                       vocab_size=49408, hidden_act='gelu', projection_dim=32, max_position_embeddings=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token='!')
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False)
    pipe.save_pretrained(output_dir)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output_dir', required=True, help='directory to write the pipeline to')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--sample_size', type=int, default=32, help='latent size (images are 2x this)')
    args = parser.parse_args()
    print(f'tiny SDXL pipeline written to {make_tiny_sdxl(args.output_dir, args.seed, args.sample_size)}')


if __name__ == '__main__':
    main()
