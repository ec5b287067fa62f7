"""Fixed English vocabularies for the synthetic haystack and tasks.

Kept in code (not downloaded) so task generation is offline and identical everywhere. The lists are
disjoint where it matters: filler names never collide with the people of planted facts, and no list
contains the words the needles are made of ("special", "magic", "number", "VAR").
"""

from __future__ import annotations

NOUNS: tuple[str, ...] = tuple(
    """
    acorn anchor apple apron arrow atlas axe badge badger bag ball balloon banner barrel basket bat beacon bead
    beetle bell belt bench berry bicycle blanket blossom boat bolt bonnet book boot bottle boulder bowl box bracelet
    branch bread brick bridge broom brush bucket button cabinet cable cactus cake camera candle canoe canvas canyon
    cap carpet cart castle cedar chair chalk cheese cherry chest chimney cloak clock cloud clover coat coin collar
    comb compass cookie coral cord cottage crane crate crayon cricket crown cup curtain cushion daisy desk diary dish
    dolphin door drum eagle easel engine envelope falcon fan feather fence fern ferret fiddle fig finch flag flask
    flute folder fork fountain fox frame frog garden gate gecko ginger glove goblet goose grape guitar hammer hammock
    harp hat hazel helmet heron hinge honey hook horn island ivy jacket jar jasmine jug kettle key kite knife ladder
    ladle lamp lantern latch leash lemon lens lever lily lizard locket lotus magnet mallet maple map marble mask mat
    meadow medal melon mirror mitten moss moth mug nail napkin necklace needle net notebook oar olive orchid otter
    oven owl paddle pail paint pan panda parcel parrot peach pear pebble pen pencil pepper piano pillow pine pipe
    pitcher plate plow plum pocket pond poppy pot pouch puzzle quilt rabbit radio rake raven reed ribbon ring river
    robe robin rope rose rug saddle sail salmon satchel saucer scarf scissors scroll seal shawl shelf shell shield
    shovel sieve skillet sled slipper spade sparrow spider spoon squirrel stamp statue stone stool stove suitcase
    swan sweater sword table tablet teapot telescope tent thimble thistle ticket tiger torch towel tray trophy
    trowel trumpet trunk tub tulip turtle umbrella valley vase vest violin wagon wallet walnut whale wheel whistle
    willow window wolf wreath yarn zebra
    """.split()
)

ADJECTIVES: tuple[str, ...] = tuple(
    """
    amber ancient bitter brave bright brisk calm careful cheerful clever crimson curious dusty eager early faded
    fancy fierce gentle gloomy golden graceful grumpy hidden hollow humble icy jolly lively lonely lucky mellow misty
    modest muddy narrow noble odd pale patient plain polished proud quiet rapid restless rough rusty sandy shiny
    silent silver sleepy slender smooth soft sparkling steady sturdy sunny swift tidy tiny velvet vivid warm weary
    wild windy wooden worn
    """.split()
)

FILLER_NAMES: tuple[str, ...] = tuple(
    """
    Alma Anton Beatrix Bruno Celia Cyril Dario Delia Edith Emil Felix Flora Greta Gustav Hugo Irene Jonas Klara
    Leon Magda Nils Olga Pablo Rosa Simon Tessa Victor Wanda Yusuf Zora
    """.split()
)

PLACES: tuple[str, ...] = (
    "the market",
    "the old library",
    "the harbor",
    "the village square",
    "the train station",
    "the bakery",
    "the riverbank",
    "the community hall",
    "the orchard",
    "the workshop",
    "the bus stop",
    "the museum",
    "the post office",
    "the town garden",
    "the hillside",
    "the lighthouse",
    "the school yard",
    "the bookshop",
    "the ferry landing",
    "the greenhouse",
    "the town hall",
    "the kitchen",
    "the attic",
    "the front porch",
    "the old mill",
)

TIMES: tuple[str, ...] = (
    "in the morning",
    "after lunch",
    "on Tuesday",
    "late in the evening",
    "during the winter",
    "before sunrise",
    "on a rainy afternoon",
    "at the end of the summer",
    "last weekend",
    "the day before the festival",
    "just after midnight",
    "early on Sunday",
    "in the middle of the week",
    "around noon",
    "that autumn",
    "when the snow melted",
    "before the guests arrived",
    "on the first warm day of spring",
)

TRANSITIVE_VERBS: tuple[str, ...] = tuple(
    """
    carried painted repaired found sold cleaned borrowed opened described moved polished wrapped measured dropped
    examined returned hid lifted noticed photographed packed admired fixed traded chose sketched lost delivered
    """.split()
)

MOTION_VERBS: tuple[str, ...] = (
    "walked slowly toward",
    "waited near",
    "rested beside",
    "wandered around",
    "hurried past",
    "sat quietly near",
    "stopped in front of",
    "strolled along",
    "lingered at",
    "looked around",
)

REASONS: tuple[str, ...] = (
    "because the weather had changed",
    "since nobody else was available",
    "because it reminded everyone of an old story",
    "although nobody had asked",
    "to make room for the new season",
    "because the neighbors were curious",
    "so that the children could see it",
    "after a long discussion",
    "without saying a word",
    "as the bells began to ring",
    "while the kettle was heating",
    "because the old one had broken",
)

OBSERVATIONS: tuple[str, ...] = (
    "The wind carried the smell of rain across the fields.",
    "A dog barked somewhere down the lane.",
    "The clouds moved slowly over the rooftops.",
    "Somebody had left the gate open again.",
    "The street lamps flickered on one by one.",
    "It was the kind of day that nobody remembers for long.",
    "A thin layer of frost covered the windows.",
    "Most of the shops closed early that week.",
    "The river was higher than usual after the storm.",
    "Children were laughing in the distance.",
    "The smell of fresh bread drifted out of an open door.",
    "Nothing much happened for the rest of the afternoon.",
    "Everyone agreed that the summer had been too short.",
    "The bells of the church rang twice and fell silent.",
    "A small crowd gathered to watch the boats come in.",
)

# People, places and objects of planted facts (simple QA); disjoint from FILLER_NAMES.
FACT_FIRST_NAMES: tuple[str, ...] = tuple(
    """
    Amara Dmitri Elias Freya Hana Ingrid Kenji Leila Lucas Marco Mira Noor Oskar Priya Quentin Rafael Selma Sofia
    Teodor Tobias
    """.split()
)

FACT_LAST_NAMES: tuple[str, ...] = tuple(
    """
    Achterberg Brennan Castellano Delacroix Eriksen Ferreira Halloran Haraldsen Kowalski Lindqvist Moreau Novak
    Okonkwo Oyelaran Petrakis Sato Tanaka Valdez Whitfield Zelinski
    """.split()
)

TOWNS: tuple[str, ...] = tuple(
    """
    Ashcombe Bramblewick Brindlemoor Coldharbor Corvale Dunmarrow Duskwater Eastholm Emberlee Fernhollow Foxmere
    Glenbury Greywell Hollinsby Kestrelford Larkmoor Northwick Oakhaven Pellingham Quarrytown Rosewold Saltmere
    Umberfield Valewood Westerhame Yarrowby
    """.split()
)

JOBS: tuple[str, ...] = tuple(
    """
    architect baker beekeeper carpenter cartographer chemist dentist electrician engineer florist gardener geologist
    glassblower jeweler librarian locksmith mechanic musician nurse pharmacist photographer pilot plumber potter
    sculptor surveyor tailor translator veterinarian watchmaker
    """.split()
)

DOG_NAMES: tuple[str, ...] = tuple(
    """
    Biscuit Bramble Chester Clementine Dottie Fudge Gizmo Mango Marlowe Noodle Nutmeg Pickles Pretzel Pumpkin
    Quincy Rascal Rusty Scout Sprocket Tofu Truffle Waffles Wrigley Ziggy
    """.split()
)


def article(word: str) -> str:
    """'a' or 'an' for a following word (by its first letter, good enough for these lists)."""
    return "an" if word[:1].lower() in "aeiou" else "a"
