"""Generated data for tests, benchmarks and the demo; nothing is downloaded.

world    a multilingual world (concept lexicon rendered per language), corpora, evaluation files, source
         tokenizers of the three masked-LM families and the two causal-LM kinds, tiny masked and causal LMs
mapping  a mapping directory whose targets are a learnable function of the words (hypernetwork tests, bench)
glot500  Glot500-c stand-ins in the published layouts (arrow as saved to disk, the parquet conversion)
demo     the demo's world: corpus, evaluation data and a briefly pretrained source model
sentencepiece  SentencePiece-only tokenizer folders, as Glot500's target tokenizer is published
"""

from .world import (  # noqa: F401  (the package's API: tests and benches use `synthetic.World`, ...)
    ALPHABETS,
    CAUSAL_FAMILIES,
    CAUSAL_TOKENIZER_FAMILIES,
    FAMILIES,
    LLAMA3_SPECIALS,
    QWEN2_SPECIALS,
    Language,
    World,
    concept_entity,
    concept_upos,
    default_languages,
    multiscript_languages,
    make_tiny_model,
    read_lines,
    skewed_sizes,
    tagged_concept_sentences,
    train_source_tokenizer,
    write_corpus,
    write_retrieval_data,
    write_tagging_data,
)
from .glot500 import glot500_standin, standin_texts, write_split_txt  # noqa: F401,E402
from .sentencepiece import train_sentencepiece_folder  # noqa: F401,E402
