"""Word lists for the synthetic dataset: real common words plus seeded pseudo-words."""

from __future__ import annotations

import random


def _split(text: str) -> list[str]:
    """Split a whitespace-separated word list; underscores stand for spaces."""
    return [w.replace("_", " ") for w in text.split()]


COMMON = _split("""
the of and to a in is it you that he was for on are with as his they be at one have this
from or had by not word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children
begin got walk example ease paper group always music those both mark often letter until mile
river car feet care second book carry took science eat room friend began idea fish mountain
stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half
rock order fire south problem piece told knew pass since top whole king space heard best
hour better true during hundred five remember step early hold west ground interest reach
fast verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern pull
cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood contain front
teach week final gave green quick develop ocean warm free minute strong special mind behind
clear tail produce fact street inch multiply nothing course stay wheel full force blue
object decide surface deep moon island foot system busy test record boat common gold
possible plane stead dry wonder laugh thousand ago ran check game shape equate miss brought
heat snow tire bring yes distant fill east paint language among delivery package refund
shipping customer quality price return size fabric cotton leather battery screen charger
cable wireless bluetooth warranty support discount coupon
""")

FIRST_NAMES = _split("""
James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara
Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy
Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew
Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Dorothy George Melissa Timothy
Deborah Ronald Stephanie Edward Rebecca Jason Sharon Jeffrey Laura Ryan Cynthia Jacob
Kathleen Gary Amy Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry Pamela
Justin Emma Scott Nicole Brandon Helen Benjamin Samantha Samuel Katherine Gregory Christine
Frank Debra Alexander Rachel Raymond Carolyn Patrick Janet Jack Catherine Dennis Maria Jerry
Heather Tyler Diane Aaron Ruth Jose Julie Adam Olivia Nathan Joyce Henry Virginia Douglas
Victoria Zachary Kelly Peter Lauren Kyle Christina Ethan Joan Walter Evelyn Noah Judith
Jeremy Megan Christian Andrea Keith Cheryl Roger Hannah Terry Jacqueline Gerald Martha
Harold Gloria Sean Teresa Austin Ann Carl Sara Arthur Madison Lawrence Frances Dylan Kathryn
Jesse Janice Jordan Jean Bryan Abigail Billy Alice Joe Julia Bruce Judy Gabriel Sophia Logan
Grace Albert Denise Willie Amber Alan Doris Juan Marilyn Wayne Danielle Elijah Beverly Randy
Isabella Roy Theresa Vincent Diana Ralph Natalie Eugene Brittany Russell Charlotte Bobby
Marie Mason Kayla Philip Alexis Louis Lori Sofia Mateo Lucia Hugo Chloe Lukas Mia Leon Ines
Yuki Hana Wei Mei Arjun Priya Omar Fatima Ivan Olga Pierre Camille Giulia Marco Lars Ingrid
""")

LAST_NAMES = _split("""
Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez
Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris
Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill
Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips
Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook
Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward
Richardson Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez
Castillo Sanders Patel Myers Long Ross Foster Jimenez Powell Jenkins Perry Russell Sullivan
Bell Coleman Butler Henderson Barnes Gonzales Fisher Vasquez Simmons Romero Jordan Patterson
Alexander Hamilton Graham Reynolds Griffin Wallace Moreno West Cole Hayes Bryant Herrera
Gibson Ellis Tran Medina Aguilar Stevens Murray Ford Castro Marshall Owens Harrison
Fernandez McDonald Woods Washington Kennedy Wells Vargas Henry Chen Freeman Webb Tucker
Guzman Burns Crawford Olson Simpson Porter Hunter Gordon Mendez Silva Shaw Snyder Mason
Dixon Munoz Hunt Hicks Holmes Palmer Wagner Black Robertson Boyd Rose Stone Salazar Fox
Warren Mills Meyer Rice Schmidt Garza Daniels Ferguson Nichols Stephens Soto Weaver Ryan
Gardner Payne Grant Dunn Kelley Spencer Hawkins Arnold Pierce Hansen Peters Santos Hart
Bradley Knight Elliott Cunningham Duncan Armstrong Hudson Carroll Lane Riley Andrews
Alvarado Ray Delgado Berry Perkins Hoffman Johnston Matthews Pena Richards Muller Schneider
Fischer Weber Dubois Moreau Rossi Russo Ferrari Tanaka Suzuki Sato Wang Li Zhang Singh Kumar
Sharma Ivanov Petrov Kowalski Nowak Jensen Nielsen Larsen
""")

CITIES = _split("""
Springfield Riverside Franklin Greenville Bristol Clinton Fairview Salem Madison Georgetown
Arlington Ashland Burlington Manchester Marion Oxford Jackson Milton Newport Auburn Dayton
Lexington Milford Winchester Hudson Kingston Mount_Vernon Clayton Dover Centerville Portland
Lincoln Oakland Richmond Chester Hamilton Columbia Troy Warren Lebanon Cleveland Hillsboro
Berlin Hamburg Munich Lyon Paris Madrid Seville Milan Turin Lisbon Porto Dublin Cork Leeds
Glasgow Toronto Vancouver Montreal Sydney Melbourne Auckland Osaka Kyoto Seoul Pune Austin
Denver Boston Seattle Chicago Atlanta Phoenix
""")

STREETS = _split("""
Main Oak Pine Maple Cedar Elm Washington Lake Hill Park Walnut Sunset Highland Forest River
Church Spring Ridge Meadow Willow Center Jefferson Lincoln Jackson Franklin Mill Chestnut
Birch Dogwood Hickory Valley Madison Adams Cherry Spruce Laurel Railroad Water Union Bridge
""")

STREET_KINDS = _split("St Ave Rd Blvd Ln Dr Ct Way Pl Ter")
COUNTRIES = _split("US US US US US GB DE FR CA CA AU ES IT NL SE JP IN BR MX PL")
EMAIL_DOMAINS = _split("""
gmail.com yahoo.com outlook.com hotmail.com icloud.com proton.me example.org
""")

_ONSETS = _split("b c d f g h j k l m n p r s t v w z br ch cl cr dr fl gr pl pr sh sl st th tr")
_VOWELS = _split("a e i o u a e i o ai ea ou ie oo")
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rt", "ck", "sh"]

VOCAB_SLOT = 12  # fixed width of one word slot in the server-side vocabulary string


def pseudo_words(count: int, seed: int = 20251125) -> list[str]:
    """Return count distinct pronounceable pseudo-words, shorter ones first."""
    rng = random.Random(seed)
    seen: set[str] = set(COMMON)
    out: list[str] = []
    while len(out) < count:
        n = 1 + min(2, int(rng.expovariate(1.2)))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(n))
        if len(word) <= VOCAB_SLOT and word not in seen:
            seen.add(word)
            out.append(word)
    out.sort(key=len)
    return out


def vocabulary(size: int = 4096) -> list[str]:
    """Return the vocabulary in frequency order: common English words, then pseudo-words."""
    common = [w for w in dict.fromkeys(COMMON) if len(w) <= VOCAB_SLOT]
    return common + pseudo_words(size - len(common))


def vocab_bytes(words: list[str]) -> bytes:
    """Pack words into fixed-width slots so SQL can pick word k with substring() in O(1)."""
    return "".join(w.ljust(VOCAB_SLOT) for w in words).encode("ascii")
