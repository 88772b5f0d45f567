"""The hierarchy as data: labels, masks, leaf probabilities, folder matching, custom files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semhinet_tf.taxonomy import IGNORE, Taxonomy, TaxonomyError


def test_default_hierarchy():
    tax = Taxonomy.default()
    assert tax.leaves == ("bogus", "normal", "bridge", "open", "cmp", "crack", "ler", "inc_etch")
    assert tax.head_names == ("h1", "h2", "h3", "h4", "h5")
    assert tax.leaf_targets("crack") == {"h1": 2, "h2": 1, "h3": IGNORE, "h4": 1, "h5": IGNORE}
    assert tax.leaf_targets("normal") == {"h1": 1, "h2": IGNORE, "h3": IGNORE, "h4": IGNORE, "h5": IGNORE}
    assert tax.loss_weights() == {"h1": 1.0, "h2": 1.0, "h3": 2.0, "h4": 2.0, "h5": 2.0}


def test_leaf_probability_is_the_product_along_the_path():
    tax = Taxonomy.default()
    probs = {"h1": np.array([[0.1, 0.2, 0.7]]), "h2": np.array([[0.5, 0.3, 0.2]]),
             "h3": np.array([[0.9, 0.1]]), "h4": np.array([[0.4, 0.6]]), "h5": np.array([[0.5, 0.5]])}
    leaf = tax.leaf_probabilities(probs)[0]
    assert leaf.sum() == pytest.approx(1.0)
    assert leaf[tax.leaf_index("bridge")] == pytest.approx(0.7 * 0.5 * 0.9)
    assert leaf[tax.leaf_index("bogus")] == pytest.approx(0.1)
    verdict = tax.decode(probs, review_threshold=0.5)[0]
    assert (verdict["verdict"], verdict["family"], verdict["class"]) == ("defect", "line", "bridge")
    assert verdict["review"] is True  # 0.315 < 0.5


@pytest.mark.parametrize("folder,leaf", [("Inc-Etch", "inc_etch"), ("IncEtch", "inc_etch"), ("LER", "ler"),
                                         ("BRIDGE", "bridge"), ("good", "normal"), ("misc", None)])
def test_folder_names_match_case_and_separator_insensitively(folder, leaf):
    assert Taxonomy.default().match_folder(folder) == leaf


def test_custom_taxonomy_from_yaml(tmp_path):
    path = tmp_path / "fab.yaml"
    path.write_text("heads:\n  - {name: gate, classes: [junk, good, bad]}\n"
                    "  - {name: kind, parent: gate.bad, classes: [scratch, particle]}\n"
                    "aliases: {particle: [pcl]}\n")
    tax = Taxonomy.from_file(path)
    assert tax.leaves == ("junk", "good", "scratch", "particle")
    assert tax.match_folder("PCL") == "particle"
    assert Taxonomy.from_spec(json.loads(json.dumps(tax.to_spec()))).leaves == tax.leaves


@pytest.mark.parametrize("spec,message", [
    ({"heads": []}, "no heads"),
    ({"heads": [{"name": "a", "classes": ["x", "y"]}, {"name": "b", "classes": ["p", "q"]}]}, "one root"),
    ({"heads": [{"name": "a", "classes": ["x", "y"]}, {"name": "b", "parent": "a.z", "classes": ["p", "q"]}]},
     "does not exist"),
    ({"heads": [{"name": "a", "classes": ["x"]}]}, "at least two"),
    ({"heads": [{"name": "ood", "classes": ["x", "y"]}]}, "reserved for the unfamiliar-frame score"),
    # malformed fields: each was an AttributeError or TypeError traceback, or (classes as one text) six
    # one-letter classes
    ({"heads": ["h1"]}, r"heads\[0\] is a str"),
    ({"heads": {"name": "a"}}, "'heads' must be a list"),
    ({"heads": [{"name": "a", "classes": "bridge"}]}, "'classes' must be a list of names"),
    ({"heads": [{"classes": ["x", "y"]}]}, r"heads\[0\] has no 'name'"),
    ({"heads": [{"name": "a", "classes": ["x", "y"]}, {"name": "b", "parent": 3, "classes": ["p", "q"]}]},
     "'parent' must be written 'head.class'"),
    ({"heads": [{"name": "a", "classes": ["x", "y"]}], "aliases": ["x"]}, "'aliases' must be a mapping"),
    ({"heads": [{"name": "a", "classes": ["x", "y"]}], "aliases": {"x": 5}}, "aliases.x must be a list"),
    ({"heads": [{"name": "a", "classes": ["x", "y"]}], "loss_weights": [1]}, "'loss_weights' must be a mapping"),
    ({"heads": [{"name": "a", "classes": ["x", "y"]}], "loss_weights": {"a": "x"}}, "loss_weights.a must be a"),
    (["heads"], "expected a mapping"),
])
def test_invalid_taxonomies_are_refused_with_a_reason(spec, message):
    with pytest.raises(TaxonomyError, match=message):
        Taxonomy.from_spec(spec)


def test_bad_taxonomy_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(TaxonomyError, match="broken.json"):
        Taxonomy.from_file(path)
    path.write_text('{"heads": ["h1"]}')
    with pytest.raises(TaxonomyError, match=r"broken.json: heads\[0\] is a str"):
        Taxonomy.from_file(path)


def test_an_alias_written_as_one_name_is_one_alias():
    tax = Taxonomy.from_spec({**Taxonomy.default().to_spec(), "aliases": {"inc_etch": "incomplete etch"}})
    assert tax.match_folder("Incomplete-Etch") == "inc_etch"


def test_flat_leaf_softmax_becomes_head_probabilities_that_multiply_back():
    tax = Taxonomy.default()
    rng = np.random.default_rng(0)
    leaf_p = rng.dirichlet(np.ones(len(tax.leaves)), size=16)
    heads = tax.as_head_probabilities({"leaf": leaf_p})
    assert set(heads) == set(tax.head_names)
    for name in tax.head_names:
        np.testing.assert_allclose(heads[name].sum(axis=1), 1.0)
    np.testing.assert_allclose(tax.leaf_probabilities(heads), leaf_p, rtol=1e-9)
    # h1 'defect' is the mass of the six defect leaves
    defect = [tax.leaves.index(leaf) for leaf in ("bridge", "open", "cmp", "crack", "ler", "inc_etch")]
    h1 = tax.head("h1")
    np.testing.assert_allclose(heads["h1"][:, h1.classes.index("defect")], leaf_p[:, defect].sum(axis=1))
