"""``python -m unet_deploy`` (also what ``torchrun -m unet_deploy`` runs)."""

from unet_deploy.cli import main

if __name__ == "__main__":
    main()
