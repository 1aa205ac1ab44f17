"""Sample quality on digits: a classifier trained on the real 8x8 digits labels generated ones.

    python -m eqm.digits_eval samples/digits/samples.npz     # accuracy of an eqm-sample output

The classifier is an RBF support-vector machine (scikit-learn) fit on a fixed 80% of load_digits();
it labels the held-out 20% about 99% correctly. Class accuracy of samples drawn for a label
("does a sample drawn as a 3 look like a 3?") is then a cheap, reproducible quality score.
"""
import argparse
import functools
import sys

import numpy as np


@functools.lru_cache(maxsize=1)
def classifier():
    """(fitted SVC, held-out accuracy): fit once per process on a fixed split of the real digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data / 16.0, d.target, test_size=0.2, random_state=0,
                                              stratify=d.target)
    clf = SVC(C=10.0, gamma="scale").fit(x_tr, y_tr)
    return clf, float((clf.predict(x_te) == y_te).mean())


def to_features(images):
    """Images -> (N, 64) floats in [0, 1], the classifier's input.

    images: (N, 1, 8, 8) or (N, 8, 8) floats in [-1, 1] (model space, torch or numpy), or
    (N, 8, 8, 3) / (N, 8, 8) uint8 (an eqm-sample npz: pixel = clamp(127.5 x + 128))."""
    x = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
        if x.ndim == 4 and x.shape[-1] == 3:
            x = x.mean(-1)
    else:
        x = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != 64:
        raise ValueError(f"expected 8x8 digit images, got {x.shape[1]} values per image")
    return x


def predict(images):
    """Predicted digit (N,) for each image (see to_features for the accepted layouts)."""
    return classifier()[0].predict(to_features(images))


def class_accuracy(images, labels):
    """Fraction of images the real-digits classifier labels as the class they were drawn for."""
    labels = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    return float((predict(images) == labels).mean())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eqm.digits_eval", description=__doc__.splitlines()[0])
    p.add_argument("npz", help="an eqm-sample samples.npz (arr_0 uint8 images, labels)")
    args = p.parse_args(argv)
    try:
        f = np.load(args.npz)
    except (OSError, ValueError) as e:
        sys.exit(f"digits_eval: error: cannot read {args.npz!r}: {e}")
    if "labels" not in f:
        sys.exit(f"digits_eval: error: {args.npz!r} has no 'labels' array (write it with eqm-sample)")
    acc = class_accuracy(f["arr_0"], f["labels"])
    print(f"class accuracy {acc:.3f} on {len(f['labels'])} samples "
          f"(classifier: {classifier()[1]:.3f} on held-out real digits)")
    return acc


if __name__ == "__main__":
    main()
