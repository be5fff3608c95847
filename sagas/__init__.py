"""sagas: a saga orchestration engine."""
