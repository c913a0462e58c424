"""A small mixed-modality task, generated deterministically: digit images, then text.

Each sample is ``BOS, 16 image tokens, SEP, text bytes, EOS``: a 16x16 handwritten-style digit
(a 5x7 glyph scaled by 2 at a random place, with dropped ink and speckles) cut into 4x4
patches, each patch one of 16 tokens (which of its 2x2 quadrants hold ink; blank background is
one token, so many image tokens are redundant), followed by a caption such as "seven odd up
left zqkt" (digit, parity, where the glyph sits, and the catalogue code of that digit at that
place) in a byte-level tokenizer. As in VLM pretraining the loss is on the text tokens only.

The codes make the task hard enough that configurations still differ after the default run:
reading the digit and its place saturates within a few hundred steps, while the 90 codes (one
per digit and place, random letters fixed for all runs) must be memorised, which takes model
capacity and keeps the loss falling.

Shapes: B samples, S = 48 positions, P = 16 patches.
"""

from dataclasses import dataclass

import torch

_GLYPHS = {  # 5 wide, 7 high
    0: ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    1: ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    2: ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    3: ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    4: ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    5: ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    6: ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    7: ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    8: ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    9: ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

IMAGE_SIZE, PATCH, SEQUENCE_LENGTH = 16, 4, 48
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2
PAD, BOS, SEP, EOS = 0, 1, 2, 3
IMAGE_OFFSET = 4  # image tokens 4..19
TEXT_OFFSET = IMAGE_OFFSET + 16  # byte b is token 20 + b
VOCAB_SIZE = 288  # 20 + 256 bytes, rounded up to a multiple of 32
IMAGE_TYPE, TEXT_TYPE, OTHER_TYPE = 0, 1, 2
TOKEN_TYPE_NAMES = ("image", "text", "other")


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S] input ids
    labels: torch.Tensor  # [B, S] next-token ids
    loss_mask: torch.Tensor  # [B, S] 1 where the label is a text byte or EOS
    token_types: torch.Tensor  # [B, S] IMAGE_TYPE / TEXT_TYPE / OTHER_TYPE of each input
    images: torch.Tensor  # [B, 16, 16] the pixels, for plots
    captions: list  # [B] str


CODE_LETTERS = 5
TOPS, LEFTS = IMAGE_SIZE - 14 + 1, IMAGE_SIZE - 10 + 1  # where the scaled glyph can sit
_CODE_SEED = 20260118  # the catalogue is the same in every run and seed


def _catalogue() -> dict:
    """(digit, top, left) -> a code of CODE_LETTERS random lowercase letters."""
    generator = torch.Generator().manual_seed(_CODE_SEED)
    letters = torch.randint(0, 26, (10, TOPS, LEFTS, CODE_LETTERS), generator=generator)
    return {(d, t, l): "".join(chr(ord("a") + int(c)) for c in letters[d, t, l])
            for d in range(10) for t in range(TOPS) for l in range(LEFTS)}


_CODES = _catalogue()


def caption(digit: int, top: int, left: int) -> str:
    """E.g. "seven odd up left zqktw": the code depends on the exact place, not only on
    the coarse one the words name."""
    horizontal = "left" if left < 2 else "center" if left < 5 else "right"
    return (f"{_WORDS[digit]} {'even' if digit % 2 == 0 else 'odd'} "
            f"{('up', 'mid', 'low')[top]} {horizontal} {_CODES[digit, top, left]}")


def encode_text(text: str) -> list:
    return [TEXT_OFFSET + byte for byte in text.encode("ascii")]


def draw_digit(digit: int, generator: torch.Generator):
    """([16, 16] float in {0, 1}, top, left): the glyph scaled by 2 at a random offset, some
    ink dropped, a few speckles added."""
    glyph = torch.tensor([[int(c) for c in row] for row in _GLYPHS[digit]], dtype=torch.float32)
    glyph = glyph.repeat_interleave(2, 0).repeat_interleave(2, 1)  # [14, 10]
    image = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    top = int(torch.randint(0, TOPS, (1,), generator=generator))
    left = int(torch.randint(0, LEFTS, (1,), generator=generator))
    image[top:top + 14, left:left + 10] = glyph
    dropped = torch.rand(IMAGE_SIZE, IMAGE_SIZE, generator=generator) < 0.1
    speckles = torch.rand(IMAGE_SIZE, IMAGE_SIZE, generator=generator) < 0.01
    return ((image > 0) & ~dropped | speckles).float(), top, left


def patch_tokens(image: torch.Tensor) -> torch.Tensor:
    """[P] image tokens: bit q of a patch's code says whether its quadrant q holds ink."""
    quadrants = image.reshape(IMAGE_SIZE // 2, 2, IMAGE_SIZE // 2, 2).amax(dim=(1, 3))  # [8, 8]
    quadrants = quadrants.reshape(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(NUM_PATCHES, 4)
    codes = (quadrants * torch.tensor([1.0, 2.0, 4.0, 8.0])).sum(dim=-1).long()
    return IMAGE_OFFSET + codes


def make_batch(batch_size: int, generator: torch.Generator) -> Batch:
    tokens = torch.full((batch_size, SEQUENCE_LENGTH + 1), PAD, dtype=torch.long)
    types = torch.full((batch_size, SEQUENCE_LENGTH + 1), OTHER_TYPE, dtype=torch.long)
    digits = torch.randint(0, 10, (batch_size,), generator=generator)
    drawn = [draw_digit(int(d), generator) for d in digits]
    images = torch.stack([image for image, _, _ in drawn])
    captions = [caption(int(d), top, left) for d, (_, top, left) in zip(digits, drawn)]
    for row, image in enumerate(images):
        text = [SEP, *encode_text(captions[row]), EOS]
        sequence = [BOS, *patch_tokens(image).tolist(), *text]
        tokens[row, : len(sequence)] = torch.tensor(sequence)
        types[row, 1: 1 + NUM_PATCHES] = IMAGE_TYPE
        types[row, 1 + NUM_PATCHES: len(sequence)] = TEXT_TYPE
    labels = tokens[:, 1:]
    loss_mask = (labels >= TEXT_OFFSET) | (labels == EOS)
    return Batch(tokens[:, :-1], labels, loss_mask.float(), types[:, :-1], images, captions)
