"""The monitor: health-checks every service and publishes the gateway's route table."""
