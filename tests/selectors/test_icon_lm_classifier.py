"""ICon's LM classifier: LoRA adapters + a 2-class head on SmolLM2, trained through train_icon_classifier."""

import numpy as np
import pyarrow as pa
import pytest

from tokensift.selectors.icon_classifier import IConClassify, IConClassifyParams, train_icon_classifier
from tokensift.selectors.icon_lm_classifier import LMClassifierParams, load_icon_classifier

MATH = ["Solve for x: 3x + 2 = 11.", "What is 17 times 4?", "Compute the integral of x squared.",
        "Find the derivative of sin(x).", "Is 91 a prime number?", "Simplify (a + b)^2.",
        "What is the square root of 144?", "Factor x^2 - 9.", "Divide 84 by 7.", "Sum the first 10 integers."]
COOKING = ["Chop the onions finely.", "Bake the bread for 40 minutes.", "Add a pinch of salt to the soup.",
           "Whisk the eggs with sugar.", "Fry the garlic in olive oil.", "Boil the pasta until al dente.",
           "Marinate the chicken overnight.", "Peel and dice the carrots.", "Grill the fish on both sides.",
           "Knead the dough for ten minutes."]


@pytest.mark.slow
def test_lora_classifier_learns_a_separable_split_and_scores_through_icon_classify(tmp_path):
    texts = [t for pair in zip(MATH, COOKING, strict=True) for t in pair]  # alternate labels 1, 0
    labels = np.array([1, 0] * len(MATH))
    params = LMClassifierParams(epochs=4, batch_size=8, max_length=16, lr=2e-3)
    out = tmp_path / "lm-classifier"
    stats = train_icon_classifier(texts, labels, out, params, test_share=0.2)  # the last 4 rows are held out
    assert stats["train_rows"] == 16 and stats["test_auc"] == 1.0
    scorer = load_icon_classifier(out)
    p = scorer.proba(["How much is 12 plus 30?", "Stir the sauce slowly."])
    assert p[0] > 0.5 > p[1]
    stage = IConClassify(IConClassifyParams(classifier=str(out), prompt_column=None, response_column=None))
    scores = stage(pa.table({"text": ["How much is 12 plus 30?"]})).column("icon_classify_score").to_pylist()
    assert scores[0] == pytest.approx(float(p[0]), abs=1e-5)
