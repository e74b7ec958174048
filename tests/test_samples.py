"""Real photographs available offline."""
import pytest

from aesformer.samples import SAMPLE_PHOTOS, sample_photo, sample_photos


def test_every_sample_is_an_rgb_photograph_of_useful_size():
    photos = sample_photos()
    assert [name for name, _ in photos] == list(SAMPLE_PHOTOS)
    for name, img in photos:
        assert img.mode == "RGB", name
        assert min(img.size) >= 256, name


def test_astronaut_is_the_known_512_square():
    img = sample_photo("astronaut")
    assert img.size == (512, 512)


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(KeyError, match="available: astronaut"):
        sample_photo("moon")
