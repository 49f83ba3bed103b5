"""Eagle heads (`specframe.eagle_head`): the target's last-layer features, drafting with them
losslessly, the head file, and `specframe train early-exit --head-kind eagle` end to end."""

from __future__ import annotations

import pytest
import torch

from specframe import SpeculativeDecoder
from specframe.eagle_head import EagleHead
from specframe.errors import PluginContractError
from specframe.heads import SHIPPED_DIR, EarlyExitHead, HeadFileError, head_class, read_head_file
from specframe.target import TargetModel
from specframe.training.dataset import DistillSet, previous_positions
from specframe.training.head import HeadTraining, evaluate, train_head
from specframe.training.shards import ShardSettings, teacher_forced_shard

from .test_early_exit import EXIT_LAYER, greedy_sequences

PROMPTS = (([5, 9, 2, 33, 5, 9], 40), ([1], 17), (list(range(3, 40)), 25))


def train_tiny_eagle(model, epochs: int = 24):
    """An eagle head trained on the model's own greedy outputs, in a few seconds."""
    sequences = greedy_sequences(model, 96, 6, 24)
    settings = ShardSettings(layers=[EXIT_LAYER], max_prompt_tokens=6, batch_size=len(sequences), top_k=16,
                             order_seed=0, max_answer_tokens=24, store_final=True)
    shard = teacher_forced_shard(model, sequences, [6] * len(sequences), settings)
    data = DistillSet.from_shards([shard], EXIT_LAYER)
    config = HeadTraining(layer=EXIT_LAYER, epochs=epochs, lr=3e-3, tokens_per_batch=512, eval_points=0,
                          loss="kl+ce", head_kind="eagle")
    head, _, vocab_map = train_head(model, data, None, config, None)
    return head, data, vocab_map


@pytest.fixture(scope="module")
def tiny_eagle(tiny_model):
    return train_tiny_eagle(tiny_model)


@pytest.fixture(scope="module")
def tiny_eagle_path(tmp_path_factory, tiny_eagle):
    head, _, _ = tiny_eagle
    return str(head.save_pretrained(tmp_path_factory.mktemp("eagle") / "eagle.safetensors", training_command="test"))


def test_the_split_keeps_last_layer_features_only_when_asked(tiny_model):
    ids = torch.tensor([5, 9, 2, 33, 5, 9, 17])
    with torch.no_grad():
        expected = tiny_model(ids[None], output_hidden_states=True).hidden_states[-1][0]  # after the final norm
    plain = TargetModel(tiny_model)
    view = plain.enable_split(EXIT_LAYER)
    plain.forward(ids)
    assert plain.final_hidden is None  # zero cost for drafters that do not ask
    with pytest.raises(PluginContractError, match="final=True"):
        view.final_hidden(0, 3)
    target = TargetModel(tiny_model)
    view = target.enable_split(EXIT_LAYER, final=True)
    target.forward(ids[:4])
    target.forward(ids[4:])
    torch.testing.assert_close(view.final_hidden(0, 7), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(PluginContractError, match="verified tokens"):
        view.final_hidden(0, 8)
    late = TargetModel(tiny_model)  # verified before the features were asked for: computed aside
    late.forward(ids)
    torch.testing.assert_close(late.enable_split(EXIT_LAYER, final=True).final_hidden(2, 7), expected[2:],
                               atol=1e-5, rtol=1e-4)


def test_cached_drafting_matches_teacher_forcing(tiny_model, tiny_eagle):
    head, _, _ = tiny_eagle
    hidden, previous = torch.randn(9, 32), torch.randn(9, 32)
    with torch.no_grad():
        full, features = head(hidden[None], previous[None])
    head.reset_cache()
    head.extend_with(hidden[:4], previous[:4], exact=True)
    step = torch.cat([head.extend_with(hidden[i : i + 1], previous[i : i + 1], exact=False)[0] for i in range(4, 7)])
    torch.testing.assert_close(step, full[0, 4:7], atol=1e-5, rtol=1e-4)
    assert head.exact_length == 4
    head.rollback(head.exact_length)
    logits, predicted = head.extend_with(hidden[4:9], previous[4:9], exact=True)
    torch.testing.assert_close(logits, full[0, 4:9], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(predicted, features[0, 4:9], atol=1e-5, rtol=1e-4)
    assert head.exact_length == 9


class _KeepDrafting:
    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return True


def test_the_drafter_reads_the_true_feature_first_and_its_own_prediction_next(tiny_model, tiny_eagle):
    """q of a round's two drafts equals the teacher-forced head on the full model's own states:
    the first reads f of the last verified position, the second the head's predicted f^."""
    from drafters.early_exit import EarlyExitDrafter
    from specframe.sampling import Sampler
    from specframe.training.dataset import previous_positions
    from specframe.types import SamplingConfig

    head = tiny_eagle[0]
    prompt, pending = [5, 9, 2, 33, 5, 9], 17
    target = TargetModel(tiny_model)
    drafter = EarlyExitDrafter(head=head)
    drafter.before_prefill(target, prompt)
    target.forward(torch.tensor(prompt), logits_to_keep=1)
    sampler = Sampler(SamplingConfig(1.0, seed=0))
    drafter.begin(target, prompt, sampler)
    draft = drafter.propose([*prompt, pending], 2, _KeepDrafting(), sampler)
    tokens = [*prompt, pending, *draft.tokens.tolist()]
    with torch.no_grad():
        states = tiny_model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        hidden, previous = states[EXIT_LAYER][:, :-1], previous_positions(states[-1][:, :-1])  # (1, P + 2, C)
        P = len(prompt)
        first, predicted = head(hidden[:, : P + 1], previous[:, : P + 1])
        previous[0, P + 1] = predicted[0, P]  # the second draft reads the head's own feature
        second, _ = head(hidden, previous)
    torch.testing.assert_close(draft.q[0], torch.softmax(first[0, P], -1), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(draft.q[1], torch.softmax(second[0, P + 1], -1), atol=1e-4, rtol=1e-3)


def test_training_raises_first_and_second_draft_agreement(tiny_model, tiny_eagle):
    head, data, vocab_map = tiny_eagle
    trained = evaluate(head, data, vocab_map, torch.device("cpu"))
    untrained = evaluate(train_tiny_eagle(tiny_model, epochs=0)[0], data, None, torch.device("cpu"))
    assert trained["answer_acceptance"] > untrained["answer_acceptance"] + 0.1, (trained, untrained)
    assert trained["second_draft_acceptance"] > untrained["second_draft_acceptance"] + 0.1, (trained, untrained)


@pytest.mark.parametrize("controller, options", [("fixed", {"k": 4}), ("thompson", {}), ("thompson_cost", {})])
def test_greedy_equality_with_an_eagle_head(tiny_model, stub_tokenizer, registry, tiny_eagle_path, controller,
                                            options):
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller=controller,
                                 controller_options=options, drafter_options={"head": tiny_eagle_path},
                                 registry=registry)
    accepted = 0
    for prompt, max_new in PROMPTS:
        expected = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new,
                                       do_sample=False)[0, len(prompt):].tolist()
        for _ in range(2):  # the second generation reuses the target and its split
            result = decoder.generate(prompt, max_new_tokens=max_new)
            assert result.tokens == expected, f"early_exit (eagle head) + {controller} differs from plain greedy"
            accepted += result.stats.accepted
    if controller == "fixed":
        assert accepted > 0, "the trained eagle head never had a draft accepted"


def test_the_head_file_records_the_kind_and_round_trips(tmp_path, tiny_model, tiny_eagle):
    head, _, _ = tiny_eagle
    path = head.save_pretrained(tmp_path / "e.safetensors")
    header, tensors = read_head_file(path)
    assert header["kind"] == "eagle" and tensors["fuse.weight"].shape == (32, 64)
    loaded = EarlyExitHead.from_pretrained(path, tiny_model)
    assert type(loaded) is EagleHead
    hidden, previous = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    with torch.no_grad():  # stored in fp16: equal to fp16 precision
        torch.testing.assert_close(loaded(hidden, previous)[0], head(hidden, previous)[0], atol=2e-2, rtol=1e-2)


def test_the_shipped_head_is_an_eagle_head_and_unknown_kinds_are_clear():
    shipped = list(SHIPPED_DIR.glob("*.safetensors"))
    assert len(shipped) == 1, "one shipped head per model: the drafter takes the first whose fingerprint matches"
    header, _ = read_head_file(shipped[0], tensors=False)
    assert head_class(header["kind"], shipped[0]) is EagleHead
    with pytest.raises(HeadFileError, match="kind 'medusa'.*upgrade specframe"):
        head_class("medusa", SHIPPED_DIR / "x.safetensors")


# ---- trees: a tree pass keeps the accepted path's features; nodes read their parent's f^ ------
def test_keep_path_keeps_the_last_layer_features_of_the_accepted_path(tiny_model):
    prompt, root = [5, 9, 2, 33, 5, 9], 17
    nodes, parents, path = [4, 8, 21, 30], (-1, 0, -1, 2), (2, 3)
    target = TargetModel(tiny_model)
    view = target.enable_split(EXIT_LAYER, final=True)
    target.forward(torch.tensor(prompt))
    target.forward_tree(torch.tensor([root, *nodes]), parents)
    target.keep_path(path)
    chain = [*prompt, root, *(nodes[n] for n in path)]
    with torch.no_grad():
        expected = tiny_model(torch.tensor([chain]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(view.final_hidden(0, len(chain)), expected, atol=1e-5, rtol=1e-4)


def _teacher_forced_confidences(model, head, prompt, pending, draft):
    """Each node's probability from the teacher-forced head on its own path: the true feature for
    the root's draft, then the head's own predicted feature at every later depth."""
    tokens, parents = draft.tokens.tolist(), draft.parents
    expected = []
    for node, token in enumerate(tokens):
        path = []
        while node >= 0:
            path.insert(0, tokens[node])
            node = parents[node]
        sequence = [*prompt, pending, *path[:-1]]
        with torch.no_grad():
            states = model(torch.tensor([sequence]), output_hidden_states=True).hidden_states
            hidden, previous = states[EXIT_LAYER], previous_positions(states[-1])
            P = len(prompt)
            for depth in range(len(path)):  # position P + depth reads f^ of the position before it
                logits, predicted = head(hidden[:, : P + depth + 1], previous[:, : P + depth + 1])
                if depth + 1 < len(path):
                    previous[0, P + depth + 1] = predicted[0, P + depth]
        expected.append(float(torch.softmax(logits[0, -1].float(), -1)[token]))
    return expected


@pytest.mark.parametrize("tree", ["fixed", "dynamic"])
def test_each_tree_node_reads_its_parents_predicted_feature(tiny_model, tiny_eagle, tree):
    from drafters.early_exit import EarlyExitDrafter
    from specframe.sampling import Sampler
    from specframe.types import SamplingConfig

    head = tiny_eagle[0]
    prompt, pending = [5, 9, 2, 33, 5, 9], 17
    target = TargetModel(tiny_model)
    drafter = EarlyExitDrafter(head=head, width=3, tree=tree)
    drafter.before_prefill(target, prompt)
    target.forward(torch.tensor(prompt), logits_to_keep=1)
    sampler = Sampler(SamplingConfig(0.0))
    drafter.begin(target, prompt, sampler)
    draft = drafter.propose([*prompt, pending], 12, _KeepDrafting(), sampler)
    assert max(len(draft.tokens), 0) > 3 and any(p >= 0 for p in draft.parents)
    expected = _teacher_forced_confidences(tiny_model, head, prompt, pending, draft)
    torch.testing.assert_close(torch.tensor(draft.confidences), torch.tensor(expected), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("options, controller, controller_options", [
    ({"width": 2}, "fixed", {"k": 6}), ({"width": 3, "tree": "dynamic"}, "fixed", {"k": 10}),
    ({"tree": "dynamic"}, "thompson_cost", {"max_width": 3, "min_k": 1})])
def test_greedy_trees_with_an_eagle_head_equal_plain_decoding(tiny_model, stub_tokenizer, registry, tiny_eagle_path,
                                                              options, controller, controller_options):
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller=controller,
                                 controller_options=controller_options, registry=registry,
                                 drafter_options={"head": tiny_eagle_path, **options})
    for prompt, max_new in PROMPTS:
        expected = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new,
                                       do_sample=False)[0, len(prompt):].tolist()
        for _ in range(2):
            result = decoder.generate(prompt, max_new_tokens=max_new)
            assert result.tokens == expected, f"eagle head, {options} + {controller} differs from plain greedy"
        assert result.stats.accepted > 0


@pytest.mark.parametrize("tree", ["fixed", "dynamic"])
def test_eagle_trees_pass_the_kit(tmp_path, tree):
    """An eagle head whose fuse mixes in the feature (not the pass-through init), on the kit's Llama."""
    from specframe import testing
    from specframe.plugins import PluginRegistry

    from .test_conformance import FAST

    model = testing.tiny_llama(seed=FAST.seed)
    head = EagleHead(model, exit_layer=2)
    with torch.no_grad():
        head.fuse.weight.add_(torch.randn(head.fuse.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    options = {"head": str(head.save_pretrained(tmp_path / "eagle.safetensors")), "width": 2, "tree": tree}
    report = testing.check_drafter("early_exit", options=options, settings=FAST, registry=PluginRegistry(autoload=False))
    assert report.passed, report
