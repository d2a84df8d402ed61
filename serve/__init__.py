"""Ray Serve application of leaf-ray: `serve run serve/config.yaml` imports serve.app:build_app."""
