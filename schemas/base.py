"""The shared pydantic configuration: camelCase on the wire, snake_case in Python."""

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """A message as it travels: camelCase aliases, unknown fields ignored, strict types.

    Strict types: a producer that sends ``"temperature": "0.5"`` gets a clear error instead of
    a silent coercion, whatever language it is written in.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        strict=True,
        frozen=True,
    )

    def to_wire(self) -> dict[str, object]:
        """The JSON object a producer would send (aliases, no unset optional fields)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
