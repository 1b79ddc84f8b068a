"""diffusers integration: SDXL style tuning as diffusers users run it, and every export checked by its loader.

The pipeline is SDXL's architecture with small channels (tools/make_tiny_sdxl.py) and the data a real clip-art style
set (tools/make_clipart_styleset.py, openclipart). The training runs use the command line documented for diffusers'
``train_text_to_image_lora_sdxl.py`` (README_sdxl.md), with tiny values. Exports are read back by the tools that
consume them: diffusers' ``load_lora_weights`` (its PEFT loader and its kohya/SGM converter), LyCORIS' own module
rebuild (``lycoris.modules.get_module``/``make_module``, what its kohya loader does per key) and
``UNet2DConditionModel.from_pretrained`` for merged weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn as nn
from visadapt_testing import load_tool as _tool

import visadapt
from visadapt.apps import train_sdxl
from visadapt.core import iter_adapted
from visadapt.integrations import diffusers_pipelines as vd
from visadapt.integrations import kohya_format as kf

PROMPT = 'cute dragon creature'


@pytest.fixture(scope='module')
def tiny_sdxl(tmp_path_factory) -> str:
    return _tool('make_tiny_sdxl').make_tiny_sdxl(str(tmp_path_factory.mktemp('tiny-sdxl')))


@pytest.fixture(scope='module')
def clipart(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp('clipart'))
    rows = _tool('make_clipart_styleset').make_styleset('food/fruit', out, resolution=48, max_images=3)
    assert len(rows) == 3 and all(r['text'].endswith(', clipart style') for r in rows)
    return out


def _fresh_accelerate_state() -> None:
    """accelerate keeps one state per process (a command-line run has its own); start each in-process run afresh."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train(argv):
    _fresh_accelerate_state()
    return train_sdxl.run_training(argv)


def _documented_command(model: str, data: str, out: str, cache: str, *extra: str):
    """README_sdxl.md's LoRA command, flag for flag, with tiny values (and tensorboard for wandb, not installed)."""
    return [f'--pretrained_model_name_or_path={model}', f'--pretrained_vae_model_name_or_path={model}/vae',
            f'--dataset_name={data}', '--caption_column=text', '--resolution=32', '--random_flip',
            '--train_batch_size=1', '--num_train_epochs=2', '--checkpointing_steps=2', '--learning_rate=1e-02',
            '--lr_scheduler=constant', '--lr_warmup_steps=0', '--mixed_precision=fp16', '--seed=42',
            f'--output_dir={out}', f'--validation_prompt={PROMPT}', '--report_to=tensorboard',
            # visadapt's extras: small validation, a private datasets cache
            '--num_validation_images=1', '--num_inference_steps=2', f'--cache_dir={cache}', *extra]


@pytest.fixture(scope='module')
def documented(tiny_sdxl, clipart, tmp_path_factory):
    """2 epochs of 3 clip-art images: 6 steps, checkpoints at 2, 4, 6."""
    out, cache = str(tmp_path_factory.mktemp('run')), str(tmp_path_factory.mktemp('cache'))
    metrics = _train(_documented_command(tiny_sdxl, clipart, out, cache))
    return out, cache, metrics


def _unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(batch, 4, 32, 32, generator=g), timestep=torch.tensor([10, 700][:batch]),
                encoder_hidden_states=torch.randn(batch, 77, 64, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(batch, 32, generator=g),
                                       time_ids=torch.tensor([[64., 64., 0., 0., 64., 64.]] * batch)))


@torch.no_grad()
def _unet_out(unet) -> torch.Tensor:
    return unet(**_unet_inputs()).sample


@torch.no_grad()
def _text_out(encoder) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 3055, 267, 9289, 268, 794, 49407]])
    return encoder(ids, output_hidden_states=True).hidden_states[-2]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _load_pipe(path: str):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_file(directory: str) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(directory, vd.DIFFUSERS_LORA_NAME))


# ---- the example's command line --------------------------------------------------------------------------------------
def test_documented_command_writes_what_diffusers_users_load(documented):
    out, _, metrics = documented
    assert metrics['steps'] == 6 and metrics['mixed_precision'] == 'fp16' and metrics['resumed_from'] is None
    for step in (2, 4, 6):  # the LoRA file and visadapt's adapter in every checkpoint, beside accelerate's state
        for name in (vd.DIFFUSERS_LORA_NAME, 'adapter/visadapt_pipeline.json', 'optimizer.bin', 'scheduler.bin'):
            assert os.path.isfile(os.path.join(out, f'checkpoint-{step}', name)), (step, name)
    for name in (vd.DIFFUSERS_LORA_NAME, 'adapter/unet/conv/adapter_model.safetensors', 'loss_curve.png',
                 'validation/validation-epoch000-0.png', 'validation/test-epoch001-0.png', 'train_metrics.json'):
        assert os.path.isfile(os.path.join(out, name)), name
    # --report_to tensorboard: the example's tracker project, one train_loss scalar per step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logs = os.path.join(out, 'logs', train_sdxl.TRACKER_PROJECT)
    events = [f for f in os.listdir(logs) if f.startswith('events.out.tfevents')]
    assert events
    acc = EventAccumulator(os.path.join(logs, events[0]))
    acc.Reload()
    losses = [e.value for e in acc.Scalars('train_loss')]
    assert [e.step for e in acc.Scalars('train_loss')] == list(range(1, 7))
    assert losses == pytest.approx([loss for _, loss in metrics['history']])
    assert set(acc.Tags()['images']) == {'validation', 'test'}


@pytest.fixture(scope='module')
def trained(documented, tiny_sdxl):
    """A fresh float32 pipeline with the run's visadapt adapters (adapter/), and its UNet's output."""
    out = documented[0]
    pipe = _load_pipe(tiny_sdxl)
    assert vd.load_into_pipeline(pipe, os.path.join(out, 'adapter')) == [('unet', 'conv'), ('unet', 'attn')]
    return pipe, _unet_out(pipe.unet)


def test_load_lora_weights_reproduces_the_trained_unet(documented, trained, tiny_sdxl):
    out = documented[0]
    _, reference = trained
    fresh = _load_pipe(tiny_sdxl)
    base = _unet_out(fresh.unet)
    fresh.load_lora_weights(out)  # the example's final step: pipeline.load_lora_weights(args.output_dir)
    assert _relative(_unet_out(fresh.unet), reference) < 1e-4
    assert _relative(base, reference) > 1e-3  # the adapters did change the UNet


def test_resume_latest_continues_the_uninterrupted_run(documented, tiny_sdxl, clipart, tmp_path):
    """Resumed mid-epoch (step 2 of 3 per epoch, random flips on): same losses and same final LoRA tensors."""
    out, cache, metrics = documented
    resumed = str(tmp_path / 'resumed')
    shutil.copytree(os.path.join(out, 'checkpoint-2'), os.path.join(resumed, 'checkpoint-2'))
    again = _train(_documented_command(tiny_sdxl, clipart, resumed, cache,
                                                        '--resume_from_checkpoint=latest'))
    assert again['resumed_from'] == os.path.join(resumed, 'checkpoint-2')
    assert again['history'] == metrics['history']  # steps 3..6 recomputed, bit for bit
    first, second = _lora_file(out), _lora_file(resumed)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resume_latest_without_a_checkpoint_starts_fresh_and_other_flags_train(tiny_sdxl, clipart, tmp_path, capsys):
    """--resume_from_checkpoint latest with none saved starts a new run (saying so); the same run uses the other
    example flags: --train_data_dir, --train_text_encoder, --use_8bit_adam (bitsandbytes), --snr_gamma,
    --noise_offset, --prediction_type, --gradient_accumulation_steps, --checkpoints_total_limit, --scale_lr,
    --center_crop, a warmup scheduler."""
    out = str(tmp_path / 'run')
    metrics = _train([
        '--pretrained_model_name_or_path', tiny_sdxl, '--train_data_dir', clipart, '--output_dir', out,
        '--resolution', '32', '--center_crop', '--train_batch_size', '1', '--gradient_accumulation_steps', '2',
        '--max_train_steps', '2', '--checkpointing_steps', '1', '--checkpoints_total_limit', '1',
        '--learning_rate', '1e-3', '--scale_lr', '--lr_scheduler', 'cosine', '--lr_warmup_steps', '1',
        '--use_8bit_adam', '--snr_gamma', '5.0', '--noise_offset', '0.1', '--prediction_type', 'v_prediction',
        '--train_text_encoder', '--seed', '0', '--report_to', 'none', '--resume_from_checkpoint', 'latest',
        '--cache_dir', str(tmp_path / 'cache'), '--export', 'kohya', 'merged'])
    assert "Checkpoint 'latest' does not exist" in capsys.readouterr().out
    assert metrics['steps'] == 2 and metrics['resumed_from'] is None
    assert sorted(d for d in os.listdir(out) if d.startswith('checkpoint-')) == ['checkpoint-2']
    optimizer = torch.load(os.path.join(out, 'checkpoint-2', 'optimizer.bin'), weights_only=True)
    states = [s.get('__bnb_optimizer_quant_state__', s) for s in optimizer['state'].values()]
    assert states and all('state1' in s and 'exp_avg' not in s for s in states)  # bitsandbytes' AdamW8bit state
    lora = _lora_file(out)
    assert {k.split('.')[0] for k in lora} == {'unet', 'text_encoder', 'text_encoder_2'}
    pipe, fresh = _load_pipe(tiny_sdxl), _load_pipe(tiny_sdxl)
    vd.load_into_pipeline(pipe, os.path.join(out, 'adapter'))
    fresh.load_lora_weights(out)
    for component in ('text_encoder', 'text_encoder_2'):
        reference = _text_out(getattr(pipe, component))
        assert _relative(_text_out(getattr(fresh, component)), reference) < 1e-4
    assert _relative(_unet_out(fresh.unet), _unet_out(pipe.unet)) < 1e-4
    _check_merged_unet(os.path.join(out, 'export', 'merged_unet'), pipe, tiny_sdxl)


def test_accelerate_dynamo_backend_compiles_the_unet_and_saves_its_adapters(tiny_sdxl, clipart, tmp_path,
                                                                           monkeypatch):
    """torch.compile as diffusers users turn it on: `accelerate launch --dynamo_backend ...` (the environment it sets;
    'eager' only traces, inductor takes minutes here). The prepared UNet is compiled, and the LoRA file holds the
    same keys and values as an uncompiled run's."""
    from torch._dynamo.eval_frame import OptimizedModule
    command = ['--pretrained_model_name_or_path', tiny_sdxl, '--train_data_dir', clipart, '--resolution', '32',
               '--train_batch_size', '1', '--max_train_steps', '2', '--learning_rate', '1e-3', '--seed', '0',
               '--lr_warmup_steps', '0', '--report_to', 'none', '--cache_dir', str(tmp_path / 'cache')]
    _train(command + ['--output_dir', str(tmp_path / 'eager')])
    monkeypatch.setenv('ACCELERATE_DYNAMO_BACKEND', 'EAGER')
    _fresh_accelerate_state()
    run = train_sdxl.setup(train_sdxl.parse_args(command + ['--output_dir', str(tmp_path / 'probe')]))
    assert isinstance(run.models.unet, OptimizedModule) and not isinstance(run.unwrap(run.models.unet),
                                                                            OptimizedModule)
    _train(command + ['--output_dir', str(tmp_path / 'compiled')])
    eager, compiled = _lora_file(str(tmp_path / 'eager')), _lora_file(str(tmp_path / 'compiled'))
    assert eager and sorted(eager) == sorted(compiled)
    assert not any('_orig_mod' in k for k in compiled)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-6)


def test_methods_without_a_lora_form_need_no_lora_weights(tiny_sdxl, clipart, tmp_path):
    """(IA)³ has no LoRA form: refused at start (naming the layer) unless --no_lora_weights; then visadapt's format."""
    argv = ['--pretrained_model_name_or_path', tiny_sdxl, '--train_data_dir', clipart, '--resolution', '32',
            '--train_batch_size', '1', '--max_train_steps', '1', '--conv_method', 'none', '--attn_method', 'IA3',
            '--report_to', 'none', '--cache_dir', str(tmp_path / 'cache')]
    with pytest.raises(ValueError, match=r'unet\..*to_q cannot be written as a diffusers LoRA.*--no_lora_weights'):
        _train([*argv, '--output_dir', str(tmp_path / 'refused')])
    out = str(tmp_path / 'run')
    assert _train([*argv, '--output_dir', out, '--no_lora_weights'])['steps'] == 1
    assert os.path.isfile(os.path.join(out, 'adapter', 'unet', 'attn', 'adapter_config.json'))
    assert not os.path.exists(os.path.join(out, vd.DIFFUSERS_LORA_NAME))


def _check_merged_unet(path: str, pipe, tiny_sdxl: str) -> None:
    from diffusers import UNet2DConditionModel
    merged = UNet2DConditionModel.from_pretrained(path)
    assert not any('visadapt' in k for k in merged.state_dict())
    assert _relative(_unet_out(merged), _unet_out(pipe.unet)) < 1e-4
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    with visadapt.adapters_disabled(pipe.unet):  # exporting did not touch the adapted model's own weights
        torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(base), rtol=0, atol=0)


def _args(*argv: str) -> argparse.Namespace:
    return train_sdxl.parse_args(['--pretrained_model_name_or_path', 'unused', '--train_data_dir', '.', *argv])


@pytest.mark.parametrize('flags,error,message', [
    (['--enable_xformers_memory_efficient_attention'], ValueError, 'xformers is not installed'),
    (['--enable_npu_flash_attention'], ValueError, 'needs an Ascend NPU'),
    (['--report_to', 'wandb'], ImportError, 'the wandb package is not installed'),
    (['--report_to', 'neptune'], ValueError, "'neptune' is not a tracker"),
    (['--lr_scheduler', 'cosine_warm'], ValueError, "'cosine_warm' is not a diffusers scheduler"),
    (['--attn_method', 'LoRAX'], ValueError, 'LoRAX'),
    (['--resume_from_checkpoint', 'checkpoint-99'], ValueError, "no checkpoint 'checkpoint-99'"),
])
def test_flags_that_cannot_work_refuse_before_loading(flags, error, message, tmp_path):
    with pytest.raises(error, match=message):
        train_sdxl.check_environment(_args('--output_dir', str(tmp_path), *flags))


def test_push_to_hub_offline_and_8bit_adam_without_bitsandbytes_refuse(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(ValueError, match='--push_to_hub: the Hugging Face Hub is off'):
        train_sdxl.check_environment(_args('--push_to_hub'))
    with pytest.raises(ValueError, match="--push_to_hub: could not create the Hub repository 'my-style'"):
        train_sdxl.create_hub_repo(_args('--push_to_hub', '--hub_model_id', 'my-style'))  # (no network needed)
    monkeypatch.setitem(sys.modules, 'bitsandbytes', None)  # as if not installed: import raises ImportError
    with pytest.raises(ImportError, match='--use_8bit_adam needs bitsandbytes'):
        train_sdxl.check_environment(_args('--use_8bit_adam'))
    with pytest.raises(SystemExit):  # argparse: neither --dataset_name nor --train_data_dir
        train_sdxl.parse_args(['--pretrained_model_name_or_path', 'unused'])


#: every flag of the example's parse_args (diffusers main, examples/text_to_image/train_text_to_image_lora_sdxl.py)
EXAMPLE_FLAGS = '''
pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant dataset_name dataset_config_name
train_data_dir image_column caption_column validation_prompt num_validation_images validation_epochs
max_train_samples output_dir cache_dir seed resolution center_crop random_flip train_text_encoder train_batch_size
num_train_epochs max_train_steps checkpointing_steps checkpoints_total_limit resume_from_checkpoint
gradient_accumulation_steps gradient_checkpointing learning_rate scale_lr lr_scheduler lr_warmup_steps snr_gamma
allow_tf32 dataloader_num_workers use_8bit_adam adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm
push_to_hub hub_token prediction_type hub_model_id logging_dir report_to mixed_precision local_rank
enable_xformers_memory_efficient_attention enable_npu_flash_attention noise_offset rank debug_loss'''.split()


def test_defaults_are_the_examples():
    flags = {option for action in train_sdxl.build_parser()._actions for option in action.option_strings}
    assert len(EXAMPLE_FLAGS) == 54 and not {f'--{name}' for name in EXAMPLE_FLAGS} - flags
    args = _args()
    assert (args.train_batch_size, args.num_train_epochs, args.max_train_steps, args.lr_warmup_steps,
            args.report_to, args.resolution, args.rank, args.output_dir, args.logging_dir, args.checkpointing_steps,
            args.image_column, args.caption_column, args.validation_epochs, args.noise_offset) == (
        16, 100, None, 500, 'tensorboard', 1024, 4, 'sd-model-finetuned-lora', 'logs', 500, 'image', 'text', 1, 0)
    assert (args.conv_rank, args.attn_rank) == (4, 4)  # --rank sets both
    assert _args('--rank', '8', '--conv_rank', '16').conv_rank == 16


# ---- the loss and the data ---------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def loss_parts(tiny_sdxl, clipart):
    from accelerate import Accelerator
    args = _args('--resolution', '32', '--center_crop', '--train_data_dir', clipart)
    args.pretrained_model_name_or_path = tiny_sdxl
    _fresh_accelerate_state()
    models = train_sdxl.load_models(args, Accelerator(cpu=True, mixed_precision='no'))
    dataset = train_sdxl.StyleDataset(train_sdxl.load_train_split(args), args, models.tokenizers, seed=0)
    return args, models, train_sdxl.collate([dataset[0]])


def test_snr_gamma_weights_the_loss_with_diffusers_compute_snr(loss_parts):
    """Batch of one: the --snr_gamma loss is the plain loss times min(SNR(t), γ) / SNR(t) (epsilon target)."""
    from diffusers.training_utils import compute_snr
    args, models, batch = loss_parts

    def loss(**flags):
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return train_sdxl.diffusion_loss(argparse.Namespace(**{**vars(args), **flags}), batch, models,
                                             generator).item()

    replay = torch.Generator().manual_seed(7)  # the draws in the loss' order: latent sample, noise, timesteps
    for _ in range(2):
        torch.randn(1, 4, 16, 16, generator=replay)
    t = torch.randint(0, 1000, (1,), generator=replay)
    snr = compute_snr(models.noise_scheduler, t)
    plain = loss(snr_gamma=None)
    assert loss(snr_gamma=5.0) == pytest.approx(plain * float(torch.clamp(snr, max=5.0) / snr), rel=1e-5)
    assert loss(snr_gamma=None, noise_offset=0.1) != plain
    assert loss(snr_gamma=None, noise_offset=0) == plain


def test_dataset_name_reads_load_dataset_folders_and_save_to_disk(loss_parts, clipart, tmp_path):
    from datasets import load_dataset
    args = copy.copy(loss_parts[0])
    args.train_data_dir, args.max_train_samples, args.cache_dir = None, 2, str(tmp_path / 'cache')
    saved = str(tmp_path / 'saved')
    load_dataset(clipart, cache_dir=args.cache_dir)['train'].save_to_disk(saved)
    for name in (clipart, saved):
        args.dataset_name = name
        split = train_sdxl.load_train_split(args)
        assert len(split) == 2 and {'image', 'text'} <= set(split.column_names)
    args.image_column = 'picture'
    with pytest.raises(ValueError, match="--image_column value 'picture' needs to be one of"):
        train_sdxl.load_train_split(args)


def test_augmentation_draws_depend_on_seed_epoch_and_index_only(loss_parts):
    """Random flips (and crops, captions) come from (seed, epoch, index), so a resumed data loader draws what the
    first run drew, whatever the global RNG did."""
    args, models, _ = loss_parts
    args = argparse.Namespace(**{**vars(args), 'center_crop': False, 'random_flip': True})
    split = train_sdxl.load_train_split(args)
    first = train_sdxl.StyleDataset(split, args, models.tokenizers, seed=3)
    second = train_sdxl.StyleDataset(split, args, models.tokenizers, seed=3)
    unflipped = train_sdxl.StyleDataset(split, argparse.Namespace(**{**vars(args), 'random_flip': False}),
                                        models.tokenizers, seed=3)[1]['pixel_values']
    flipped = set()
    for epoch in range(8):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        torch.rand(5)  # the global RNG moves between the two reads
        image = first[1]['pixel_values']
        assert torch.equal(image, second[1]['pixel_values'])
        assert torch.equal(image, unflipped) or torch.equal(image, unflipped.flip(-1))
        flipped.add(torch.equal(image, unflipped.flip(-1)))
    assert flipped == {True, False}  # the draws change with the epoch: some epochs flip image 1, some do not


# ---- our format and the pipeline -------------------------------------------------------------------------------------
def test_pipeline_load_generate_unload(documented, tiny_sdxl):
    out = documented[0]
    pipe = _load_pipe(tiny_sdxl)
    base_unet = _unet_out(pipe.unet)

    def image():
        return pipe('an apple, clipart style', num_inference_steps=2, height=64, width=64, output_type='np',
                    generator=torch.Generator().manual_seed(0)).images[0]

    base = image()
    assert len(vd.load_into_pipeline(pipe, os.path.join(out, 'adapter'))) == 2
    assert float(abs(image() - base).max()) > 1e-4
    vd.unload_from_pipeline(pipe)
    assert not any(visadapt.adapter_names(getattr(pipe, c)) for c in vd.PIPELINE_COMPONENTS)
    assert torch.equal(_unet_out(pipe.unet), base_unet)
    assert (image() == base).all()
    with pytest.raises(FileNotFoundError, match='visadapt_pipeline.json'):
        vd.load_into_pipeline(pipe, tiny_sdxl)


# ---- kohya / LyCORIS and diffusers' converters -----------------------------------------------------------------------
def _randomize(*models: nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if p.requires_grad and name.rsplit('.', 1)[-1] == 'm':  # DoRA's magnitude: keep it near ‖W‖
                    p.mul_(1.2)
                elif p.requires_grad:
                    p.normal_(0, std)


@pytest.fixture(scope='module')
def adapted(tiny_sdxl):
    """Random non-zero adapters: FLoRA on every UNet conv, LoRA on the UNet's and both text encoders' attention."""
    pipe = _load_pipe(tiny_sdxl)
    visadapt.inject(pipe.unet, vd.target_config(pipe.unet, 'conv', 'FLoRA', r=6, r3=2), name='conv')
    visadapt.inject(pipe.unet, vd.target_config(pipe.unet, 'attention', 'LoRA', r=2), name='attn')
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        visadapt.inject(encoder, vd.target_config(encoder, 'text_attention', 'LoRA', r=3), name='attn')
    _randomize(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    return pipe


def _peft_deltas(model: nn.Module) -> dict:
    """ΔW of every PEFT LoRA layer diffusers created, by PEFT's own get_delta_weight."""
    return {name: m.get_delta_weight(next(iter(m.lora_A))) for name, m in model.named_modules()
            if hasattr(m, 'lora_A') and len(m.lora_A)}


def _check_peft_deltas(model: nn.Module, fresh: nn.Module, prefix: str = '') -> int:
    deltas = _peft_deltas(fresh)
    layers = dict(iter_adapted(model))
    assert {prefix + n for n in layers} == set(deltas)
    for name, module in layers.items():
        torch.testing.assert_close(deltas[prefix + name], module.delta_weight(list(module.visadapt)),
                                   rtol=1e-5, atol=1e-6)
    return len(deltas)


def test_kohya_sgm_names_round_trip_through_diffusers_converter(adapted, tiny_sdxl):
    """sd-scripts' SDXL names (chain form): diffusers' kohya/SGM converter rebuilds every layer's ΔW."""
    state = kf.kohya_state_dict(adapted, unet_names='sgm', tucker=False)
    modules = {k.split('.')[0] for k in state}
    assert {'lora_unet_input_blocks_0_0', 'lora_unet_out_2', 'lora_unet_input_blocks_3_0_op',
            'lora_unet_input_blocks_4_0_in_layers_2', 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q',
            'lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0', 'lora_unet_middle_block_2_out_layers_3',
            'lora_unet_output_blocks_2_2_conv', 'lora_unet_output_blocks_3_0_skip_connection',
            'lora_te1_text_model_encoder_layers_0_self_attn_q_proj',
            'lora_te2_text_model_encoder_layers_2_self_attn_out_proj'} <= modules
    assert not any('down_blocks' in m or 'up_blocks' in m or 'lora_mid' in k for m in modules for k in state)
    fresh = _load_pipe(tiny_sdxl)
    fresh.load_lora_weights(dict(state))
    assert _check_peft_deltas(adapted.unet, fresh.unet) == len(dict(iter_adapted(adapted.unet)))
    for component in ('text_encoder', 'text_encoder_2'):
        _check_peft_deltas(getattr(adapted, component), getattr(fresh, component))
        assert _relative(_text_out(getattr(fresh, component)), _text_out(getattr(adapted, component))) < 1e-5
    assert _relative(_unet_out(fresh.unet), _unet_out(adapted.unet)) < 1e-5


def test_kohya_tucker_locon_rebuilds_exactly_in_lycoris(adapted):
    """Conv FLoRA as Tucker LoCon (lora_mid): LyCORIS' own module rebuild gives each layer's ΔW."""
    from lycoris.modules import get_module, make_module
    state = kf.kohya_state_dict(adapted)  # sgm names, Tucker
    names = kf.sgm_module_names(adapted.unet, [n for n, _ in iter_adapted(adapted.unet)])
    kinds = {}
    for layer_name, module in iter_adapted(adapted.unet):
        key = f'lora_unet_{names[layer_name]}'.replace('.', '_')
        algo, params = get_module(state, key)
        lyco = make_module(algo, params, key, module)
        kind = f'{type(lyco).__name__}{"-tucker" if lyco.tucker else ""}'
        kinds[kind] = kinds.get(kind, 0) + 1
        torch.testing.assert_close(lyco.get_diff_weight()[0], module.delta_weight(list(module.visadapt)),
                                   rtol=1e-5, atol=1e-6)
    n_kxk = sum(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in adapted.unet.modules())
    assert kinds['LoConModule-tucker'] == n_kxk and kinds['LoConModule'] == len(names) - n_kxk
    assert state['lora_unet_input_blocks_0_0.lora_mid.weight'].shape == (6, 6, 3, 3)  # conv_in: r_in 4 padded to 6
    assert state['lora_unet_input_blocks_0_0.lora_down.weight'].shape == (6, 4, 1, 1)


def test_kohya_dora_scale_and_full_diff_rebuild_in_lycoris(tiny_sdxl):
    """DoRA → dora_scale (diffusers' SDXL loader drops it, so LyCORIS' rebuild checks it); (IA)³ → full diff, BitFit
    → diff and diff_b (its bias update)."""
    from diffusers import UNet2DConditionModel
    from lycoris.modules import get_module, make_module
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    visadapt.inject(unet, vd.target_config(unet, 'attention', 'DoRA', r=2), name='attn')
    visadapt.inject(unet, visadapt.IA3Config(target_types=['Conv2d'], include=['conv_out']), name='ia3')
    visadapt.inject(unet, visadapt.get_config_class('BitFit')(target_types=['Conv2d'], include=['conv_in']),
                    name='bias')
    _randomize(unet)
    state = kf.kohya_state_dict({'unet': unet})
    checked = 0
    for layer_name, module in iter_adapted(unet):
        key = 'lora_unet_' + kf.sgm_module_names(unet, [layer_name])[layer_name].replace('.', '_')
        algo, params = get_module(state, key)
        lyco = make_module(algo, params, key, module)
        weight, bias = lyco.get_merged_weight()
        expected_weight, expected_bias = module.adapted_params(torch.float32)
        torch.testing.assert_close(weight, expected_weight, rtol=1e-5, atol=1e-5)
        if f'{key}.diff_b' in state:
            torch.testing.assert_close(bias, expected_bias, rtol=1e-5, atol=1e-6)
        checked += 1
    assert state['lora_unet_out_2.diff'].shape == unet.conv_out.weight.shape
    assert 'lora_unet_input_blocks_0_0.diff_b' in state and 'lora_unet_out_2.diff_b' not in state
    assert state['lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale'].shape == (64, 1)
    assert checked == 98  # 96 DoRA attention projections, conv_out, conv_in


def test_diffusers_lora_file_holds_dora_and_mixed_ranks(tiny_sdxl, tmp_path):
    """DoRA on the attention beside FLoRA (chain ranks 2..6) on the convs of one UNet: PEFT's DoRA per component."""
    pipe = _load_pipe(tiny_sdxl)
    visadapt.inject(pipe.unet, vd.target_config(pipe.unet, 'conv', 'FLoRA', r=6, r3=2), name='conv')
    visadapt.inject(pipe.unet, vd.target_config(pipe.unet, 'attention', 'DoRA', r=2), name='attn')
    _randomize(pipe.unet)
    vd.save_diffusers_lora(pipe, str(tmp_path))
    from safetensors import safe_open
    with safe_open(str(tmp_path / vd.DIFFUSERS_LORA_NAME), 'pt') as f:
        meta = json.loads(f.metadata()['lora_adapter_metadata'])
    assert meta['unet.use_dora'] and meta['unet.rank_pattern'] and meta['unet.rank_pattern'] == \
        meta['unet.alpha_pattern']
    fresh = _load_pipe(tiny_sdxl)
    fresh.load_lora_weights(str(tmp_path))
    assert _relative(_unet_out(fresh.unet), _unet_out(pipe.unet)) < 1e-4


def test_sgm_names_of_the_full_sdxl_unet_map_back_through_diffusers():
    """Every conv and linear of the real SDXL UNet config (on the meta device): sd-scripts' SGM name, read back to
    the diffusers path by diffusers' own kohya/SGM converter."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    from visadapt.apps.bench_sdxl import SDXL_UNET
    with torch.device('meta'):
        unet = UNet2DConditionModel(**SDXL_UNET)
    paths = [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = kf.sgm_module_names(unet, paths)
    assert names['down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k'] == \
        'input_blocks.8.1.transformer_blocks.9.attn2.to_k'
    assert (names['down_blocks.1.downsamplers.0.conv'], names['up_blocks.1.upsamplers.0.conv'],
            names['up_blocks.2.resnets.2.conv_shortcut'], names['mid_block.resnets.0.time_emb_proj']) == (
        'input_blocks.6.0.op', 'output_blocks.5.2.conv', 'output_blocks.8.0.skip_connection',
        'middle_block.0.emb_layers.1')
    state = {}
    for path in paths:
        key = 'lora_unet_' + names[path].replace('.', '_')
        state.update({f'{key}.lora_down.weight': torch.zeros(1, 1), f'{key}.lora_up.weight': torch.zeros(1, 1)})
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix('unet.'): v for k, v in converted.items()})
    assert {k.rsplit('.lora_', 1)[0] for k in peft} == set(paths)
    with pytest.raises(ValueError, match="has no SGM name"):
        kf.sgm_module_names(unet, ['down_blocks.0.extra'])


def test_kohya_tucker_padding_and_stacking_rebuild_exactly():
    """FLoRA with r_out != r_in (zero-padded square mid) and two adapters on one layer (stacked), per LyCORIS."""
    from lycoris.functional.locon import diff_weight
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, stride=2), nn.Linear(8, 12))
    visadapt.inject(model, visadapt.FLoRAConfig(r=6, r3=2, scale=3.0, target_types=['Conv2d']), name='conv')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, alpha=4.0, include=['1']), name='extra')   # stacked on conv 1
    visadapt.inject(model, visadapt.FLoRAConfig(r=5, scale=0.5, target_types=['Linear']), name='lin')
    _randomize(model, std=1.0)
    state = kf.kohya_state_dict({'unet': model}, unet_names='diffusers')
    for i, layer in enumerate(model):
        key = f'lora_unet_{i}'
        down, up, mid = (state.get(f'{key}.lora_{k}.weight') for k in ('down', 'up', 'mid'))
        gamma = float(state[f'{key}.alpha']) / down.shape[0]  # LyCORIS: scale = alpha / lora_dim
        rebuilt = diff_weight(down, up, mid, gamma=gamma, backend='torch')
        expected = sum(a.delta_weight() for a in layer.visadapt.values())
        torch.testing.assert_close(rebuilt.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
    assert state['lora_unet_0.lora_mid.weight'].shape == (6, 6, 3, 3)  # r_in = 3 padded to r_out = 6
    assert state['lora_unet_1.lora_down.weight'].shape == (6 + 2, 16, 3, 3)  # FLoRA chain (6) + LoRA (2): no mid
    assert 'lora_unet_1.lora_mid.weight' not in state
    with pytest.raises(ValueError, match="unet_names='sgm' needs a diffusers UNet2DConditionModel"):
        kf.kohya_state_dict({'unet': model})


@pytest.mark.parametrize('method,fields', [('FLoRA', dict(r=4, scale=2.0)), ('LoRA', dict(r=4, alpha=8.0)),
                                           ('MoSLoRA', dict(r=4)), ('SeRA', dict(r=4, alpha=2.0)),
                                           ('SVFT', dict()), ('VeRA', dict()), ('MELoRA', dict(r=2, n=2)),
                                           ('IA3', dict())])
def test_every_linear_method_exports_exactly(method, fields):
    """Methods with a factored form (``Adapter.factor_form``) as lora_down/lora_up, others ((IA)³ here) as LyCORIS'
    full ``diff``; ΔW rebuilt exactly."""
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    visadapt.inject(model, visadapt.get_config_class(method)(**fields))
    _randomize(model, std=1.0)
    state = kf.kohya_state_dict({'unet': model}, unet_names='diffusers')
    for i in (0, 2):
        key, expected = f'lora_unet_{i}', model[i].delta_weight('default')
        if f'{key}.diff' in state:
            rebuilt = state[f'{key}.diff']
        else:
            rebuilt = state[f'{key}.lora_up.weight'] @ state[f'{key}.lora_down.weight'] * (
                float(state[f'{key}.alpha']) / state[f'{key}.lora_down.weight'].shape[0])
        torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)
    assert ('lora_unet_0.diff' in state) == (method == 'IA3')
    if method == 'IA3':
        with pytest.raises(ValueError, match='cannot be written as a diffusers LoRA'):
            vd.diffusers_lora_state_dict({'unet': model})


def test_attention_only_lora_export_loads_into_the_unet(tiny_sdxl):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    base = copy.deepcopy(unet)
    visadapt.inject(unet, vd.target_config(unet, 'attention', 'SeRA', r=4, alpha=2.0), name='attn')
    _randomize(unet, std=0.3)
    state = vd.diffusers_lora_state_dict({'unet': unet})['unet']
    n_attn = sum(n.split('.')[-1] in ('to_q', 'to_k', 'to_v') or n.endswith('to_out.0') for n, _ in unet.named_modules())
    assert len(state) == 2 * n_attn  # lora_A and lora_B of every attention projection
    base.load_lora_adapter(state, prefix=None, adapter_name='sera', metadata=vd.diffusers_lora_metadata(state))
    torch.testing.assert_close(_unet_out(base), _unet_out(unet), rtol=1e-4, atol=1e-4)


# ---- targets, budgets, errors --------------------------------------------------------------------------------------
def test_presets_select_every_conv_and_the_attention(tiny_sdxl):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    convs = {n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)}
    report = visadapt.inject(unet, vd.target_config(unet, 'conv', 'FLoRA', r=4), name='conv')
    assert set(report.layers) == convs and {'conv_in', 'conv_out', 'down_blocks.0.downsamplers.0.conv'} <= convs
    report = visadapt.inject(unet, vd.target_config(unet, 'attention', 'LoRA', r=2), name='attn')
    attn = {n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and
            (n.split('.')[-1] in ('to_q', 'to_k', 'to_v') or n.endswith('to_out.0'))}
    assert set(report.layers) == attn and len(attn) == 96  # 12 transformer blocks x 2 attentions x 4
    with pytest.raises(ValueError, match="preset 'mlp' is not valid"):
        vd.target_config(unet, 'mlp')


def test_budget_at_most_meets_the_budget(tiny_sdxl):
    import dataclasses

    from diffusers import UNet2DConditionModel

    from visadapt.core.budget import count_adapter_params, match_budget
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    flora = vd.target_config(unet, 'conv', 'FLoRA', r=8, r3=2)
    budget = count_adapter_params(unet, flora)
    lora = match_budget(unet, vd.target_config(unet, 'conv', 'LoRA', r=1), budget, at_most=True).config
    assert count_adapter_params(unet, lora) <= budget
    assert count_adapter_params(unet, dataclasses.replace(lora, r=lora.r + 1)) > budget
    report = visadapt.inject(unet, flora)
    assert report.adapter_params == budget  # the meta-device count equals the real one
    with pytest.raises(ValueError, match='too small'):
        match_budget(unet, flora, 10, at_most=True)


def test_bf16_frozen_weights_fp32_adapters_under_autocast(tiny_sdxl):
    """The mixed-precision setting of the training tool: bf16 UNet, fp32 FLoRA/SeRA adapters, autocast forward."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet').to(torch.bfloat16)
    visadapt.inject(unet, vd.target_config(unet, 'conv', 'FLoRA', r=4, forward_path='weight'), name='conv')
    visadapt.inject(unet, vd.target_config(unet, 'attention', 'SeRA', r=4), name='attn')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = unet(**_unet_inputs()).sample.float().pow(2).mean()
    loss.backward()
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if not p.requires_grad)
