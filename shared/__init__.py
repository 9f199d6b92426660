"""What the API and the workers share: settings, models, events, keys, the store."""
