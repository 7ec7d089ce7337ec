"""Training in generations (Yang, Xie, Qiao, Yuille, arXiv 1805.05551): `kdlab generations`.

The one home of chains: `config` (the chain file, its `chain:` settings embedding the tolerant
method's config, the per-generation experiment configs), `runner` (training the generations in
order under the run-folder rules) and `report` (per-generation rows and ensembles). It sits
above `engine/` (it trains with the `Trainer`) and `analysis/` (secondary metrics); only
`commands/` and `reproduce/` import it. See docs/tolerant.md.
"""
from kdlab.generations.config import (
    Chain,
    ChainSettings,
    format_notation,
    is_chain_file,
    load_chain,
    parse_notation,
)

__all__ = ["Chain", "ChainSettings", "format_notation", "is_chain_file", "load_chain", "parse_notation"]
