"""Vocabulary of the synthetic city: land-use classes, POI taxonomy, chain names, NS-SeC.

Plain data, no logic. The land-use classes are the ten NLUD-based classes of the
London LUC ground truth used by the AETHER paper (the same names and ids as
``../shared/data/london/sampled_points_landuse.geojson``, including its spelling),
so a config written for the synthetic city reads like one written for London.

Each POI subcategory carries where it occurs (weights over land-use classes),
how common it is, and its loadings on the two hidden socioeconomic dimensions
(``affluence``, ``student``); chains carry their own affluence loading, so names
also carry socioeconomic signal, as they do in real data (Waitrose vs Iceland).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# --------------------------------------------------------------------------- land use
LANDUSE_NAMES: tuple[str, ...] = (
    "High density residential with retail and commercial sites",
    "Low density residential with amenities (suburbs and small villages / hamlets)",
    "Medium density residential with high streets and amenities",
    "Agriculture - mainly crops",
    "Deciduous woodland",
    "Recreational land",
    "Principle Transport",
    "Industrial areas",
    "Large complex buildings various use (travel/recreation/ retail)",
    "Water",
)
N_CLASSES = len(LANDUSE_NAMES)
HDR, LDR, MDR, AGRI, WOOD, REC, TRANSPORT, IND, LARGE, WATER = range(N_CLASSES)
RESIDENTIAL = (HDR, LDR, MDR)

# London LUC sample counts per class (895×5, 847, 603, 270, 254, 248 for ids 0..9):
# the LUC points are drawn per class in these proportions.
LONDON_LUC_COUNTS: tuple[int, ...] = (895, 895, 895, 895, 895, 847, 603, 270, 254, 248)

# Residential physical form ("morphology"), independent of the social field.
MORPH_NAMES: tuple[str, ...] = ("terraced", "detached/semi-detached", "flats/estates")

# --------------------------------------------------------------------------- NS-SeC
# London mean proportions of ns-sec_1..9 (ONS Census 2021, LSOA level), and
# logit loadings on (affluence, student). Bins: 1 higher managerial/professional,
# 2 lower managerial/professional, 3 intermediate, 4 small employers/own account,
# 5 lower supervisory/technical, 6 semi-routine, 7 routine, 8 never worked /
# long-term unemployed, 9 full-time students.
NSSEC_BASE: tuple[float, ...] = (0.178, 0.207, 0.099, 0.112, 0.038, 0.086, 0.086, 0.102, 0.093)
NSSEC_AFFLUENCE: tuple[float, ...] = (0.62, 0.30, -0.02, 0.04, -0.30, -0.45, -0.52, -0.50, -0.12)
NSSEC_STUDENT: tuple[float, ...] = (-0.05, 0.05, -0.08, -0.22, -0.08, 0.0, 0.0, 0.12, 0.62)

# --------------------------------------------------------------------------- POIs
# Where a subcategory occurs: weights over land-use ids.
_W = dict[int, float]
HIGH: _W = {HDR: 1.0, LARGE: 0.8, MDR: 0.7, LDR: 0.1}
CORE: _W = {LARGE: 1.0, HDR: 0.8, MDR: 0.15}
RES: _W = {HDR: 0.8, MDR: 1.0, LDR: 0.6}
SUBURB: _W = {LDR: 1.0, MDR: 0.4}
INDU: _W = {IND: 1.0, TRANSPORT: 0.2}
TRANS: _W = {TRANSPORT: 1.0, LARGE: 0.3}
RECR: _W = {REC: 1.0, WOOD: 0.2}
WOODS: _W = {WOOD: 1.0, REC: 0.3}
FARM: _W = {AGRI: 1.0, WOOD: 0.1}
WET: _W = {WATER: 1.0}


def _mix(*ws: _W) -> _W:
    out: dict[int, float] = {}
    for w in ws:
        for k, v in w.items():
            out[k] = max(out.get(k, 0.0), v)
    return out


@dataclass(frozen=True)
class Subcategory:
    """One POI subcategory: where it occurs, how common, and its social loadings."""

    category: str
    name: str
    where: _W
    freq: float
    affluence: float = 0.0
    student: float = 0.0
    # Chains/brand names with their own affluence loading; empty → generic names.
    names: tuple[tuple[str, float], ...] = ()
    # Suffix for generic names ("<Place> <suffix>"); None → names only from ``names``.
    generic: str | None = None
    unnamed: float = 0.08
    extra: dict = field(default_factory=dict)


_ED = "Eating and Drinking"
_RT = "Retail"
_HE = "Health"
_EDU = "Education"
_SE = "Sport and Entertainment"
_CS = "Commercial Services"
_PI = "Public Infrastructure"
_TR = "Transport"
_MP = "Manufacturing and Production"
_AL = "Attractions and Leisure"

SUBCATEGORIES: tuple[Subcategory, ...] = (
    # Eating and drinking
    Subcategory(_ED, "cafes", _mix(HIGH, RES), 3.0, 0.2, 0.4,
                (("Costa Coffee", 0.0), ("Starbucks", 0.2), ("Caffe Nero", 0.3),
                 ("Pret A Manger", 0.6), ("Gail's Bakery", 1.3), ("Greggs", -0.9)), "Cafe"),
    Subcategory(_ED, "restaurants", HIGH, 3.0, 0.3, 0.1,
                (("Pizza Express", 0.3), ("Nando's", -0.1), ("Wagamama", 0.3),
                 ("Dishoom", 0.9), ("Zizzi", 0.3), ("Franco Manca", 0.5)), "Kitchen"),
    Subcategory(_ED, "fast food takeaways", _mix(HIGH, RES), 3.0, -0.9, 0.3,
                (("McDonald's", -0.3), ("KFC", -0.5), ("Chicken Cottage", -1.2),
                 ("Dixy Chicken", -1.2), ("Subway", 0.0), ("Domino's Pizza", -0.2)), "Express"),
    Subcategory(_ED, "fish and chip shops", RES, 1.0, -0.6, 0.0, (), "Fish Bar"),
    Subcategory(_ED, "pubs", _mix(RES, HIGH), 2.0, 0.0, 0.3,
                (("The Red Lion", 0.0), ("The Crown", 0.0), ("The King's Head", 0.1),
                 ("The Royal Oak", 0.2), ("The White Hart", 0.2), ("Wetherspoon", -0.6))),
    Subcategory(_ED, "wine bars", HIGH, 1.0, 1.2, 0.2,
                (("Vinoteca", 1.0), ("The Cork and Bottle", 0.8), ("Humble Grape", 1.0)), "Wine Rooms"),
    Subcategory(_ED, "fine dining restaurants", CORE, 0.6, 1.3, 0.0,
                (("The Ivy", 1.2), ("Hawksmoor", 1.0)), "Brasserie"),
    Subcategory(_ED, "bubble tea shops", HIGH, 0.6, 0.0, 1.3,
                (("Chatime", 0.0), ("Gong Cha", 0.0), ("Bubbleology", 0.2))),
    # Retail
    Subcategory(_RT, "supermarkets", RES, 2.0, 0.0, 0.0,
                (("Waitrose", 1.3), ("Marks and Spencer Food", 0.9), ("Sainsbury's", 0.3),
                 ("Tesco", 0.0), ("Asda", -0.6), ("Lidl", -0.8), ("Aldi", -0.8), ("Iceland", -1.2))),
    Subcategory(_RT, "convenience stores", RES, 3.0, -0.3, 0.2,
                (("Tesco Express", 0.0), ("Sainsbury's Local", 0.3), ("Co-op Food", 0.0),
                 ("Londis", -0.5), ("Costcutter", -0.6), ("Nisa Local", -0.5)), "Food and Wine"),
    Subcategory(_RT, "delicatessens", _mix(HIGH, RES), 0.8, 1.2, 0.0, (), "Deli"),
    Subcategory(_RT, "discount stores", _mix(HIGH, RES), 1.2, -1.1, 0.0,
                (("Poundland", -1.0), ("B&M", -0.8), ("Home Bargains", -0.8), ("Poundstretcher", -1.1))),
    Subcategory(_RT, "pawnbrokers", HIGH, 0.5, -1.3, 0.0,
                (("H&T Pawnbrokers", -1.0), ("Cash Converters", -1.0), ("Ramsdens", -1.0))),
    Subcategory(_RT, "boutiques", HIGH, 1.0, 1.1, 0.1, (), "Boutique"),
    Subcategory(_RT, "charity shops", _mix(HIGH, RES), 1.0, -0.3, 0.3,
                (("Oxfam", 0.2), ("British Heart Foundation", -0.2), ("Cancer Research UK", 0.0),
                 ("Sue Ryder", 0.0))),
    Subcategory(_RT, "bookshops", HIGH, 0.6, 0.5, 0.8, (("Waterstones", 0.5), ("Foyles", 0.8)), "Books"),
    Subcategory(_RT, "organic food shops", RES, 0.5, 1.2, 0.2, (("Planet Organic", 1.2), ("Whole Foods Market", 1.3)), "Organics"),
    Subcategory(_RT, "department stores", CORE, 0.4, 0.4, 0.0,
                (("John Lewis", 0.8), ("Selfridges", 1.3), ("Primark", -0.6), ("TK Maxx", -0.2))),
    Subcategory(_RT, "shopping centres", {LARGE: 1.0}, 0.3, 0.0, 0.0, (), "Shopping Centre"),
    # Health
    Subcategory(_HE, "GP surgeries", RES, 1.2, 0.0, 0.0, (), "Medical Centre"),
    Subcategory(_HE, "pharmacies", _mix(RES, HIGH), 1.5, 0.0, 0.0,
                (("Boots", 0.1), ("Superdrug", -0.2), ("Lloyds Pharmacy", 0.0), ("Well Pharmacy", -0.2)), "Pharmacy"),
    Subcategory(_HE, "private clinics", _mix(HIGH, RES), 0.6, 1.3, 0.0, (), "Private Clinic"),
    Subcategory(_HE, "dental practices", RES, 1.0, 0.2, 0.0, (), "Dental Practice"),
    Subcategory(_HE, "opticians", HIGH, 0.6, 0.2, 0.0, (("Specsavers", -0.2), ("Vision Express", 0.0)), "Opticians"),
    Subcategory(_HE, "hospitals", {LARGE: 1.0}, 0.1, 0.0, 0.0, (), "Hospital"),
    # Education
    Subcategory(_EDU, "primary schools", RES, 1.0, 0.0, -0.3, (), "Primary School"),
    Subcategory(_EDU, "secondary schools", RES, 0.5, 0.0, -0.2, (), "Academy"),
    Subcategory(_EDU, "nurseries", _mix(RES, SUBURB), 0.8, 0.4, -0.6, (), "Nursery"),
    Subcategory(_EDU, "universities and colleges", CORE, 0.4, 0.2, 1.3, (), "College", unnamed=0.02),
    Subcategory(_EDU, "tutoring centres", RES, 0.4, 0.9, -0.2, (("Kumon", 0.6), ("Explore Learning", 0.8)), "Tuition"),
    Subcategory(_EDU, "student halls of residence", HIGH, 0.5, -0.1, 1.6, (("Unite Students", 0.0), ("iQ Student", 0.0)), "House"),
    # Sport and entertainment
    Subcategory(_SE, "gyms", _mix(HIGH, RES), 1.2, 0.2, 0.6,
                (("PureGym", -0.3), ("The Gym Group", -0.4), ("Anytime Fitness", 0.0),
                 ("Virgin Active", 0.7), ("Third Space", 1.3))),
    Subcategory(_SE, "yoga studios", _mix(HIGH, RES), 0.5, 1.1, 0.3, (), "Yoga"),
    Subcategory(_SE, "art galleries", _mix(CORE, HIGH), 0.5, 1.2, 0.4, (), "Gallery"),
    Subcategory(_SE, "theatres", CORE, 0.3, 0.7, 0.2, (), "Theatre"),
    Subcategory(_SE, "cinemas", _mix(CORE, {LARGE: 1.0}), 0.3, 0.0, 0.3,
                (("Odeon", 0.0), ("Vue", -0.2), ("Everyman", 1.1), ("Picturehouse", 0.6))),
    Subcategory(_SE, "betting shops", _mix(HIGH, RES), 1.0, -1.3, 0.1,
                (("Ladbrokes", -1.0), ("William Hill", -1.0), ("Coral", -1.0),
                 ("Paddy Power", -0.9), ("Betfred", -1.0))),
    Subcategory(_SE, "amusement arcades", HIGH, 0.4, -1.0, 0.2, (), "Amusements"),
    Subcategory(_SE, "golf courses", _mix(RECR, SUBURB), 0.2, 1.0, -0.3, (), "Golf Club"),
    Subcategory(_SE, "sports grounds", RECR, 0.8, 0.0, 0.0, (), "Sports Ground"),
    Subcategory(_SE, "nightclubs", CORE, 0.4, 0.0, 1.1, (), "Club"),
    # Commercial services
    Subcategory(_CS, "estate agents", _mix(HIGH, RES), 1.2, 1.0, 0.0,
                (("Foxtons", 0.6), ("Savills", 1.3), ("Knight Frank", 1.4), ("Winkworth", 0.9),
                 ("Hamptons", 1.1), ("Purplebricks", -0.2), ("Your Move", -0.3))),
    Subcategory(_CS, "solicitors", _mix(CORE, HIGH), 0.8, 0.6, 0.0, (), "Solicitors"),
    Subcategory(_CS, "banks", HIGH, 0.6, 0.3, 0.0,
                (("Barclays", 0.0), ("HSBC", 0.1), ("NatWest", 0.0), ("Lloyds Bank", 0.0), ("Coutts", 1.6))),
    Subcategory(_CS, "payday lenders", HIGH, 0.4, -1.2, 0.0,
                (("The Money Shop", -1.0), ("Cash Generator", -1.0), ("QuickCash Loans", -1.1))),
    Subcategory(_CS, "laundrettes", RES, 0.6, -0.8, 0.5, (), "Launderette"),
    Subcategory(_CS, "hairdressers", _mix(RES, HIGH), 1.5, 0.0, 0.0, (("Toni and Guy", 0.8), ("Supercuts", -0.3)), "Hair"),
    Subcategory(_CS, "nail bars", HIGH, 0.8, -0.4, 0.3, (), "Nails"),
    Subcategory(_CS, "offices", CORE, 1.5, 0.3, 0.0, (("Regus", 0.2), ("WeWork", 0.5)), "House"),
    # Public infrastructure
    Subcategory(_PI, "libraries", RES, 0.4, 0.2, 0.3, (), "Library"),
    Subcategory(_PI, "community centres", RES, 0.6, -0.7, 0.0, (), "Community Centre"),
    Subcategory(_PI, "job centres", HIGH, 0.3, -1.3, 0.0, (("Jobcentre Plus", -1.0),)),
    Subcategory(_PI, "places of worship", RES, 1.0, -0.2, 0.0, (), "Church"),
    Subcategory(_PI, "post offices", RES, 0.6, 0.0, 0.0, (("Post Office", 0.0),)),
    Subcategory(_PI, "police stations", HIGH, 0.2, 0.0, 0.0, (), "Police Station"),
    Subcategory(_PI, "electricity substations", _mix(INDU, {LDR: 0.2, AGRI: 0.2}), 0.4, 0.0, 0.0, (), "Substation", unnamed=0.5),
    # Transport
    Subcategory(_TR, "bus stops", _mix(RES, HIGH, {TRANSPORT: 1.0}), 3.0, 0.0, 0.0, (), "Stop", unnamed=0.4),
    Subcategory(_TR, "railway stations", _mix({TRANSPORT: 1.0}, CORE), 0.5, 0.0, 0.0, (), "Station", unnamed=0.0),
    Subcategory(_TR, "car parks", {LARGE: 1.0, TRANSPORT: 0.6, IND: 0.5, REC: 0.2}, 1.0, -0.2, 0.0,
                (("NCP", 0.0),), "Car Park", unnamed=0.5),
    Subcategory(_TR, "petrol stations", {TRANSPORT: 1.0, LDR: 0.4, IND: 0.5}, 0.6, -0.2, 0.0,
                (("Shell", 0.0), ("BP", 0.0), ("Esso", 0.0), ("Texaco", -0.2))),
    Subcategory(_TR, "bike hire docking stations", CORE, 0.6, 0.6, 0.6, (("Santander Cycles", 0.0),)),
    Subcategory(_TR, "piers", WET, 0.3, 0.0, 0.0, (), "Pier", unnamed=0.0),
    Subcategory(_TR, "bus depots", {TRANSPORT: 1.0, IND: 1.0}, 0.3, 0.0, 0.0, (), "Bus Garage"),
    # Manufacturing and production
    Subcategory(_MP, "warehouses", INDU, 2.0, -0.3, 0.0, (("Amazon", 0.0), ("DHL", 0.0)), "Distribution Centre"),
    Subcategory(_MP, "factories", INDU, 1.5, -0.3, 0.0, (), "Works"),
    Subcategory(_MP, "builders merchants", INDU, 0.8, 0.0, 0.0,
                (("Travis Perkins", 0.0), ("Jewson", 0.0), ("Screwfix", -0.1), ("Wickes", 0.0))),
    Subcategory(_MP, "vehicle repair garages", _mix(INDU, RES), 1.0, -0.7, 0.0, (("Kwik Fit", -0.2), ("Halfords Autocentre", 0.0)), "Motors"),
    Subcategory(_MP, "recycling centres", INDU, 0.3, 0.0, 0.0, (), "Recycling Centre"),
    Subcategory(_MP, "farms", FARM, 1.0, 0.2, 0.0, (), "Farm", unnamed=0.1),
    Subcategory(_MP, "sewage treatment works", _mix(INDU, {WATER: 0.4}), 0.1, 0.0, 0.0, (), "Treatment Works"),
    # Attractions and leisure
    Subcategory(_AL, "parks", RECR, 1.5, 0.0, 0.0, (), "Park", unnamed=0.05),
    Subcategory(_AL, "playgrounds", _mix(RECR, {MDR: 0.3, LDR: 0.3}), 1.0, 0.0, -0.5, (), "Playground", unnamed=0.4),
    Subcategory(_AL, "allotments", _mix(RECR, SUBURB), 0.4, 0.3, -0.4, (), "Allotments"),
    Subcategory(_AL, "nature reserves", WOODS, 0.8, 0.2, 0.0, (), "Nature Reserve"),
    Subcategory(_AL, "picnic sites", _mix(WOODS, FARM), 0.4, 0.0, 0.0, (), "Picnic Site", unnamed=0.4),
    Subcategory(_AL, "museums", CORE, 0.4, 0.6, 0.3, (), "Museum"),
    Subcategory(_AL, "marinas", WET, 0.4, 0.6, 0.0, (), "Marina"),
    Subcategory(_AL, "boat clubs", WET, 0.3, 0.8, 0.0, (), "Rowing Club"),
    Subcategory(_AL, "historic buildings", CORE, 0.5, 0.4, 0.0, (), "Hall"),
    Subcategory(_AL, "riding stables", FARM, 0.3, 0.8, 0.0, (), "Riding Stables"),
)

CATEGORIES: tuple[str, ...] = (_ED, _RT, _HE, _EDU, _SE, _CS, _PI, _TR, _MP, _AL)

# Place words for generic names ("Northfield Primary School", "Riverside Deli").
PLACE_WORDS: tuple[str, ...] = (
    "Northfield", "Oakwood", "Riverside", "St Mary's", "Kingsbridge", "Elmhurst", "Ashford",
    "Highgate", "Westmoor", "Brookside", "Greenway", "Hillcrest", "Mill Lane", "Victoria",
    "Albion", "Station Road", "Park View", "Church Street", "Marsh Lane", "Queen's", "Abbey",
    "Fairfield", "Holloway", "Belmont", "Cedar", "Harbour", "Linden", "Meadow", "Bridge Street",
    "Orchard", "Canal Side", "Castle", "Windmill", "Wharf", "Grove", "Crown", "Market Street",
)
