"""A legacy practice-management schema, before carnet: notes in a plain TEXT column."""
