"""The zoo trains to real accuracy: quantisation tests on it mean something."""


def test_digits_cnn_is_accurate(digits):
    print(f"digits CNN test accuracy {digits.accuracy:.4f}")
    assert digits.accuracy > 0.95


def test_transformer_learns_its_task(transformer):
    print(f"transformer accuracy {transformer.accuracy:.4f}")
    assert transformer.accuracy > 0.9


def test_gru_learns_its_task(gru):
    print(f"GRU accuracy {gru.accuracy:.4f}")
    assert gru.accuracy > 0.9
