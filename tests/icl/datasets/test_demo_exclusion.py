"""No strategy gives a query a demonstration of its own image or video (its other captions would leak the answer)."""

import pytest

from helpers.published_layouts import coco_karpathy, msrvtt, tiny_config
from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.evaluation import evaluation_groups
from mmict_kernels.icl.sampling import STRATEGIES, DemoSampler, epoch_groups


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    # 6 images x 4 captions: the nearest neighbour of a caption is always another caption of its image.
    train, _ = coco_karpathy(tmp, n_train=6, n_eval=1, captions=4)
    return build_run(tiny_config(tmp, train, train))  # evaluated on its own training images too


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_demonstrations_never_show_the_query_image(coco_run, strategy):
    ds = coco_run.train_set
    assert len(ds) == 24 and len({e.media for e in ds.examples}) == 6
    sampler = DemoSampler(ds, ds, 3, strategy, seed=5)
    for epoch in (0, 1):
        for group in sampler.groups(epoch_groups(ds.tasks(), strategy, 2, seed=5, epoch=epoch), epoch):
            shown = {ds[q].media for q in group.queries}
            assert len(group.demos) == 3 and not shown & {ds[d].media for d in group.demos}, (strategy, group)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_evaluation_demonstrations_never_show_the_query_image(coco_run, strategy):
    """Evaluated on its training images (one query per image, all captions): the pool's captions of it are left out."""
    queries, pool = coco_run.eval_set, coco_run.train_set
    assert len(queries) == 6
    sampler = DemoSampler(pool, queries, 4, strategy, seed=1)
    for group in sampler.groups(evaluation_groups(queries, strategy, 2, seed=1), 0):
        shown = {queries[q].media for q in group.queries}
        assert not shown & {pool[d].media for d in group.demos}, (strategy, group)


def test_similar_picks_the_nearest_other_image(coco_run):
    ds = coco_run.train_set
    emb = ds.image_embeddings()
    sampler = DemoSampler(ds, ds, 2, "similar")
    for q in (0, 5, 13):
        sims = emb @ emb[q]
        other = sorted((float(sims[i]) for i in range(len(ds)) if ds[i].media != ds[q].media), reverse=True)
        demos = sampler.group([q], 0).demos
        # The two most similar of the other images' examples (captions of one image tie), the most similar last.
        assert [float(sims[d]) for d in demos] == pytest.approx(other[:2][::-1])
        assert all(ds[d].media != ds[q].media for d in demos)


def test_too_few_other_videos_is_a_clear_error(tmp_path):
    train, val = msrvtt(tmp_path, splits=("train", "train", "validate"))
    run = build_run(tiny_config(tmp_path, train, val))
    with pytest.raises(ValueError, match=r"only 3 demonstration candidates .*other images than the query's.*num_demos=4"):
        DemoSampler(run.train_set, run.train_set, 4, "random").group([0], 0)
