"""Integrations: glue between the core and an ecosystem (timm, OpenMMLab, diffusers, open_clip); each module
imports only :mod:`visadapt.core`'s public API and is named so it does not shadow the package it wraps."""
