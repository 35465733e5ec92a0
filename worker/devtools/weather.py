"""The weather bot's tools, from the OpenAI Assistants function-calling docs (used by the demo).

``WORKER_TOOLS=worker.devtools.weather`` registers them. Their answers are fixed, as in the
docs' sample, so the offline demo always tells the same story. They only read, so they are
``idempotent``: a call interrupted by a crash is simply run again.
"""

from handlers.tools import tool

NICKNAMES = {"Seattle, WA": "The Emerald City", "San Francisco, CA": "The Golden City"}


@tool(idempotent=True)
def getUserFavoriteCity() -> str:
    """Get the user's favorite city."""
    return "Seattle, WA"


@tool(idempotent=True)
def getCityNickname(location: str) -> str:
    """Get the nickname of a city.

    location: the city and state, e.g. San Francisco, CA
    """
    return NICKNAMES.get(location, f"The {location.split(',')[0]} Metropolis")


@tool(idempotent=True)
def getWeatherAtLocation(location: str, unit: str = "f") -> str:
    """Get the current weather at a location.

    location: the city and state, e.g. San Francisco, CA
    unit: "c" or "f"
    """
    return "70 degrees and sunny" if unit == "f" else "21 degrees and sunny"
