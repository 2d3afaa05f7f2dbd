"""Signed model updates on the device: fetching TUF metadata and artifacts over MQTT, verifying them."""
