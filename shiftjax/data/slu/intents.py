"""The Fluent Speech Commands (FSC) intent vocabulary: slots, the 31 intents, phrasings.

FSC (Lugosch et al., Interspeech 2019) labels each utterance with three slots, written
in its CSV files exactly as below (``change language`` with a space, capitalized
languages, ``none`` for an empty slot):

  action    activate, bring, change language, deactivate, decrease, increase
  object    none, music, lights, volume, heat, lamp, newspaper, juice, socks, shoes,
            Chinese, Korean, English, German
  location  none, kitchen, bedroom, washroom

Only 31 of the slot combinations occur; an utterance is correct only if all three slots
are (the intent is the triple). Class ``i`` is ``INTENTS[i]``, the triples in sorted
order of their ``"action_object_location"`` names (Python string order: capitalized
languages sort before ``none``):

   0 activate_lamp_none             16 deactivate_lights_bedroom
   1 activate_lights_bedroom        17 deactivate_lights_kitchen
   2 activate_lights_kitchen        18 deactivate_lights_none
   3 activate_lights_none           19 deactivate_lights_washroom
   4 activate_lights_washroom       20 deactivate_music_none
   5 activate_music_none            21 decrease_heat_bedroom
   6 bring_juice_none               22 decrease_heat_kitchen
   7 bring_newspaper_none           23 decrease_heat_none
   8 bring_shoes_none               24 decrease_heat_washroom
   9 bring_socks_none               25 decrease_volume_none
  10 change language_Chinese_none   26 increase_heat_bedroom
  11 change language_English_none   27 increase_heat_kitchen
  12 change language_German_none    28 increase_heat_none
  13 change language_Korean_none    29 increase_heat_washroom
  14 change language_none_none      30 increase_volume_none
  15 deactivate_lamp_none

``PHRASINGS`` gives, for each intent, 6-8 commands in the style of FSC's prompts, 223 in
all, written for the synthetic stand-in (``synthetic.py``); they are not FSC's own 248.
"""

from __future__ import annotations

ACTIONS = ("activate", "bring", "change language", "deactivate", "decrease", "increase")
OBJECTS = ("none", "music", "lights", "volume", "heat", "lamp", "newspaper", "juice",
           "socks", "shoes", "Chinese", "Korean", "English", "German")
LOCATIONS = ("none", "kitchen", "bedroom", "washroom")

_ROOMS = ("kitchen", "bedroom", "washroom")
_LANGUAGES = ("Chinese", "English", "German", "Korean")


def intent_name(action: str, obj: str, location: str) -> str:
  """``('activate', 'lights', 'kitchen')`` -> ``'activate_lights_kitchen'``."""
  return f"{action}_{obj}_{location}"


def _all_intents() -> tuple[tuple[str, str, str], ...]:
  triples = [("activate", "music", "none"), ("deactivate", "music", "none"),
             ("activate", "lamp", "none"), ("deactivate", "lamp", "none"),
             ("increase", "volume", "none"), ("decrease", "volume", "none"),
             ("change language", "none", "none")]
  triples += [("change language", lang, "none") for lang in _LANGUAGES]
  triples += [("bring", thing, "none") for thing in ("newspaper", "juice", "socks", "shoes")]
  for room in ("none",) + _ROOMS:
    triples += [("activate", "lights", room), ("deactivate", "lights", room),
                ("increase", "heat", room), ("decrease", "heat", room)]
  return tuple(sorted(triples, key=lambda t: intent_name(*t)))


INTENTS: tuple[tuple[str, str, str], ...] = _all_intents()
INTENT_NAMES: tuple[str, ...] = tuple(intent_name(*t) for t in INTENTS)
NUM_INTENTS = len(INTENTS)
assert NUM_INTENTS == 31, NUM_INTENTS
_INDEX = {t: i for i, t in enumerate(INTENTS)}


def intent_index(action: str, obj: str, location: str) -> int:
  """Class index of a slot triple; ValueError naming it if FSC has no such intent."""
  try:
    return _INDEX[(action, obj, location)]
  except KeyError:
    raise ValueError(f"({action!r}, {obj!r}, {location!r}) is not one of the "
                     f"{NUM_INTENTS} Fluent Speech Commands intents") from None


# ------------------------------------------------------------------------------ phrasings


def _lights(on: bool, room: str) -> list[str]:
  w = "on" if on else "off"
  if room == "none":
    return [f"turn {w} the lights", f"switch {w} the lights", f"lights {w}",
            f"turn the lights {w}", f"switch the lights {w}",
            "lights on please" if on else "kill the lights"]
  return [f"turn {w} the lights in the {room}", f"switch {w} the {room} lights",
          f"{room} lights {w}", f"turn the {room} lights {w}", f"lights {w} in the {room}",
          f"switch the lights {w} in the {room}", f"turn {w} the {room} lights"]


def _heat(up: bool, room: str) -> list[str]:
  verb, w = ("increase", "up") if up else ("decrease", "down")
  warm = "warmer" if up else "cooler"
  if room == "none":
    return [f"{verb} the heat", f"turn the heat {w}", f"turn {w} the heat", f"heat {w}",
            f"{verb} the temperature", f"turn the temperature {w}", f"make it {warm}",
            "it is too cold" if up else "it is too hot"]
  return [f"{verb} the heat in the {room}", f"turn the heat {w} in the {room}",
          f"turn {w} the heat in the {room}", f"{room} heat {w}",
          f"{verb} the temperature in the {room}", f"make the {room} {warm}",
          f"turn {w} the {room} temperature",
          f"the {room} is too cold" if up else f"the {room} is too hot"]


def _phrasings() -> dict[str, tuple[str, ...]]:
  p: dict[tuple[str, str, str], list[str]] = {}
  p[("activate", "music", "none")] = [
      "play music", "play the music", "start the music", "put on some music",
      "resume the music", "turn the music on", "music on"]
  p[("deactivate", "music", "none")] = [
      "pause music", "pause the music", "stop the music", "stop playing music",
      "turn the music off", "music off", "turn off the music"]
  for on in (True, False):
    w = "on" if on else "off"
    p[("activate" if on else "deactivate", "lamp", "none")] = [
        f"turn {w} the lamp", f"switch {w} the lamp", f"lamp {w}", f"turn the lamp {w}",
        f"switch the lamp {w}", f"turn the desk lamp {w}"]
  p[("increase", "volume", "none")] = [
      "increase the volume", "turn up the volume", "volume up", "louder",
      "make it louder", "turn the volume up", "louder please", "i can not hear that"]
  p[("decrease", "volume", "none")] = [
      "decrease the volume", "turn down the volume", "volume down", "quieter",
      "make it quieter", "turn the volume down", "too loud", "lower the volume"]
  p[("change language", "none", "none")] = [
      "change language", "change the language", "switch language",
      "switch the language", "language settings", "open the language settings",
      "set the language"]
  for lang in _LANGUAGES:
    p[("change language", lang, "none")] = [
        f"switch to {lang}", f"change the language to {lang}", f"set the language to {lang}",
        f"use {lang}", f"change language to {lang}", f"set my phone's language to {lang}",
        f"i want {lang}"]
  for thing in ("newspaper", "juice", "socks", "shoes"):
    obj = {"newspaper": "the newspaper", "juice": "some juice", "socks": "my socks",
           "shoes": "my shoes"}[thing]
    p[("bring", thing, "none")] = [
        f"bring me {obj}", f"get me {obj}", f"fetch {obj}", f"go get {obj}",
        f"bring {obj}", f"fetch me {obj}", f"i need {obj}"]
  for room in ("none",) + _ROOMS:
    p[("activate", "lights", room)] = _lights(True, room)
    p[("deactivate", "lights", room)] = _lights(False, room)
    p[("increase", "heat", room)] = _heat(True, room)
    p[("decrease", "heat", room)] = _heat(False, room)
  assert set(p) == set(INTENTS), set(INTENTS) ^ set(p)
  return {intent_name(*t): tuple(p[t]) for t in INTENTS}


PHRASINGS: dict[str, tuple[str, ...]] = _phrasings()


def _check_unambiguous() -> None:
  seen: dict[str, str] = {}
  for name, texts in PHRASINGS.items():
    for text in texts:
      if seen.setdefault(text, name) != name:
        raise AssertionError(f"{text!r} phrases both {seen[text]} and {name}")


_check_unambiguous()
