"""Reader of the ``shards`` format: WebDataset shards as the packer writes them (and img2dataset's).
:mod:`ernievil2.data.shard_reader` (and webdataset with it) is imported only when the reader is called,
so importing this package stays standard-library only."""
from __future__ import annotations

from collections.abc import Iterator

from ernievil2.data.formats.base import BAD_RECORD, FormatError, ImageSource, Item, Problem, Record, Source, SourceSpec


def read_shards(spec: SourceSpec) -> Source:
    """Every sample of WebDataset shards (``input``: folder, brace pattern, glob or list), shard by
    shard in list order, decoded by :func:`~ernievil2.data.shard_reader.read_shard`; a sample that
    does not decode, or a damaged shard, is a :data:`BAD_RECORD` problem naming shard and key.
    ``language`` overrides the samples' own."""
    from ernievil2.data.sample import BadSample
    from ernievil2.data.shard_reader import list_shards, read_shard, read_sizes, shard_sizes

    try:
        urls = list_shards(spec.input)
    except (OSError, ValueError) as exn:
        raise FormatError(f"shards {spec.input}: {exn}") from None

    def records() -> Iterator[Record]:
        for url, expected in zip(urls, shard_sizes(urls)):
            damage: list[Exception] = []
            for key, sample in read_shard(url, lambda u, exn: damage.append(exn), expected):
                where = f"{url}: sample {key}"
                if isinstance(sample, BadSample):
                    yield Problem(BAD_RECORD, where, str(sample))
                else:
                    yield Item(sample.key, list(sample.captions), ImageSource(data=sample.image), where,
                               spec.language or sample.lang, sample.objects, dict(sample.meta))
            if damage:
                yield Problem(BAD_RECORD, f"{url}: damaged shard", str(damage[0]))

    return Source(records(), total=read_sizes(urls))

