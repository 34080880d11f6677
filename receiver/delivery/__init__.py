"""Delivery of finished streams, off the streams' path: uploads to object storage and signed
webhooks, each from a queue on disk (``queue``) that survives crashes.

Modules: ``service`` (``Delivery``: the lifecycle, the sink, the workers), ``upload`` (obstore),
``webhooks`` (the HTTP side), ``signing`` (Standard Webhooks), ``queue`` (the files on disk).
"""

from receiver.delivery.service import Delivery, DeliverySink

__all__ = ["Delivery", "DeliverySink"]
