"""Language codes as the project writes them: `<ISO 639-3>_<ISO 15924>`, e.g. `eng_Latn`, `jpn_Jpan`.

The shape is checked by `config.LANG_CODE`; here the script half is checked against the ISO 15924 register, so a
code that looks right but names no script (`jpn_Japn`, Glot500-c's own spelling of Japanese) is refused where it
is written, not found missing from the evaluation data after hours of training.
"""

from __future__ import annotations

import difflib

# ISO 15924 four-letter script codes (the register as of 2025), private-use Qaaa..Qabx aside (`is_script`).
ISO_15924 = frozenset("""
    Adlm Afak Aghb Ahom Arab Aran Armi Armn Avst Bali Bamu Bass Batk Beng Berf Bhks Blis Bopo Brah Brai Bugi Buhd
    Cakm Cans Cari Cham Cher Chis Chrs Cirt Copt Cpmn Cprt Cyrl Cyrs Deva Diak Dogr Dsrt Dupl Egyd Egyh Egyp Elba
    Elym Ethi Gara Geok Geor Glag Gong Gonm Goth Gran Grek Gujr Gukh Guru Hanb Hang Hani Hano Hans Hant Hatr Hebr
    Hira Hluw Hmng Hmnp Hntl Hrkt Hung Inds Ital Jamo Java Jpan Jurc Kali Kana Kawi Khar Khmr Khoj Kitl Kits Knda
    Kore Kpel Krai Kthi Lana Laoo Latf Latg Latn Leke Lepc Limb Lina Linb Lisu Loma Lyci Lydi Mahj Maka Mand Mani
    Marc Maya Medf Mend Merc Mero Mlym Modi Mong Moon Mroo Mtei Mult Mymr Nagm Nand Narb Nbat Newa Nkdb Nkgb Nkoo
    Nshu Ogam Olck Onao Orkh Orya Osge Osma Ougr Palm Pauc Pcun Pelm Perm Phag Phli Phlp Phlv Phnx Piqd Plrd Prti
    Psin Ranj Rjng Rohg Roro Runr Samr Sara Sarb Saur Seal Sgnw Shaw Shrd Shui Sidd Sidt Sind Sinh Sogd Sogo Sora
    Soyo Sund Sunu Sylo Syrc Syre Syrj Syrn Tagb Takr Tale Talu Taml Tang Tavt Tayo Telu Teng Tfng Tglg Thaa Thai
    Tibt Tirh Tnsa Todr Tols Toto Tutg Ugar Vaii Visp Vith Wara Wcho Wole Xpeo Xsux Yezi Yiii Zanb Zinh Zmth Zsye
    Zsym Zxxx Zyyy Zzzz
""".split())


def is_script(script: str) -> bool:
    """An ISO 15924 code, or one of the private-use codes Qaaa..Qabx (generated worlds use private-use codes)."""
    if script in ISO_15924:
        return True
    return len(script) == 4 and script[:2] == "Qa" and "aa" <= script[2:] <= "bx" and script[3].islower()


def script_problem(code: str) -> str:
    """Why `code` (`lang_Script`) names no ISO 15924 script ('' when it does), with the closest code as a hint."""
    script = code.rsplit("_", 1)[-1]
    if is_script(script):
        return ""
    close = difflib.get_close_matches(script, sorted(ISO_15924), n=1, cutoff=0.5)
    hint = f" (did you mean {code[: -len(script)]}{close[0]}?)" if close else ""
    return f"{script} in {code} is not an ISO 15924 script code{hint}"


# Glot500-c names a few languages with codes that are not ISO 15924 (its hub configs and folders): the corpus
# readers accept those names and report the standard code, and ask the hub for its own name.
GLOT500_NAMES = {"jpn_Jpan": "jpn_Japn"}
STANDARD_CODES = {name: code for code, name in GLOT500_NAMES.items()}


def standard_code(name: str) -> str:
    """A corpus file's or folder's language name as the project writes it (`jpn_Japn` -> `jpn_Jpan`)."""
    return STANDARD_CODES.get(name, name)


def glot500_name(code: str) -> str:
    """The name Glot500-c gives the language `code` (its hub config, its folder)."""
    return GLOT500_NAMES.get(code, code)
