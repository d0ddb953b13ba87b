"""Data curation: score pairs with a CLIP model, filter them (DataComp's rules, near-duplicates, MetaCLIP
balancing), write the kept ones as new shards, each step with a data card. Walk-through: docs/curation.md.

clipforge prep score SHARDS --model M --out DIR        (curation.score)
clipforge prep filter DIR --out KEPT [rules]           (curation.filter, curation.dedup)
clipforge prep reshard SHARDS --kept KEPT --out NEW    (curation.reshard)
"""
