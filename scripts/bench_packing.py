"""Exact-bit packing speed: pack and unpack throughput per code width, against a memory copy and numpy.

    python scripts/bench_packing.py                   # widths 1-16, 16M codes, one thread
    python scripts/bench_packing.py --codes 4000000 --bits 3 4 10

Codes are random in ``[0, 2^bits)`` in their narrowest dtype (``code_dtype``); ``pack_codes`` writes
``bits`` bits per code, ``unpack_codes`` reads them back in that dtype. Anchors in the same run: a copy of
the unpacked codes (``clone``, the memory-bandwidth roofline for touching them once) and, at 1 bit,
numpy's ``packbits``/``unpackbits`` (bit order ``little``, the same layout). Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tokenizers_q.packing import TokenSpec, code_dtype, pack_codes, unpack_codes


def best(repeats: int, fn, *args, **kwargs) -> float:
    """Seconds of the fastest of ``repeats`` calls ``fn(*args, **kwargs)`` after one warm-up."""
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", type=int, default=16 * 2**20)
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(1, 17)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.codes
    print(f"{n / 1e6:.1f}M codes, {args.threads} thread(s), best of {args.repeats}; M codes/s\n")
    print("| bits | pack | unpack | copy (clone) | pack vs copy | unpack vs copy | numpy packbits / unpackbits |")
    print("|---|---|---|---|---|---|---|")
    for bits in args.bits:
        spec = TokenSpec((2**bits,))
        codes = torch.randint(0, 2**bits, (n, 1), generator=torch.Generator().manual_seed(bits)).to(code_dtype(bits))
        packed = pack_codes(codes, spec)
        assert torch.equal(unpack_codes(packed, spec, (n, 1)), codes)
        pack = n / best(args.repeats, pack_codes, codes, spec) / 1e6
        unpack = n / best(args.repeats, unpack_codes, packed, spec, (n, 1)) / 1e6
        copy = n / best(args.repeats, codes.clone) / 1e6
        anchor = "-"
        if bits == 1:
            flat = codes.reshape(-1).numpy()
            bytes_ = np.packbits(flat, bitorder="little")
            assert np.array_equal(bytes_, packed.numpy())
            np_pack = n / best(args.repeats, np.packbits, flat, bitorder="little") / 1e6
            np_unpack = n / best(args.repeats, np.unpackbits, bytes_, bitorder="little") / 1e6
            anchor = f"{np_pack:.0f} / {np_unpack:.0f}"
        print(
            f"| {bits} | {pack:.0f} | {unpack:.0f} | {copy:.0f} | {pack / copy:.2f} | {unpack / copy:.2f} | {anchor} |"
        )


if __name__ == "__main__":
    main()
