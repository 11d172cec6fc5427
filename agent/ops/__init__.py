"""Operations: installing the service, cgroups for the learner."""
